"""A kernel-relayed pair's state in userspace: its two sides, what the verdict and
TCP counted for them at the last check, and how it sleeps between checks.
kernel_relay.py registers pairs and runs the checks.
"""
from __future__ import annotations

import fcntl
import math
import socket
import struct
from typing import NamedTuple

from gevent.hub import Waiter

from . import keeper
from .kernel_abi import CONNECTION_BROKEN, SO_COOKIE, Connection

SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
_TCP_INFO_SIZE = 232
TCP_ESTABLISHED, TCP_CLOSE = 1, 7
# States after a FIN arrived (TCP_CLOSE counts when no error is pending:
# a socket that finished both FINs while we held it ends there).
_FIN_RECEIVED = {6, 8, 9, 11}  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_FIN_SENT = {4, 5, 6, 9, 11}   # FIN_WAIT1, FIN_WAIT2, TIME_WAIT, LAST_ACK, CLOSING


class TcpCounters(NamedTuple):
    state: int
    acked: int      # tcpi_bytes_acked: written to the socket and acknowledged
    received: int   # tcpi_bytes_received (counts a FIN's sequence number too)

    @classmethod
    def of(cls, sock: socket.socket) -> "TcpCounters":
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        return cls(info[0], *struct.unpack_from("<QQ", info, 120))

    @property
    def fin_received(self) -> bool:
        return self.state in _FIN_RECEIVED or self.state == TCP_CLOSE


class KernelCounts(NamedTuple):
    """What the verdict counted for one socket (its CONNECTION_MAP entry)."""
    redirected: int   # received and redirected to the peer
    passed: int       # received while paused: kept on the socket for userspace
    broken: bool = False   # the verdict could not cut bytes received twice (CONNECTION_BROKEN)
    skbs: int = 0     # the skbs of `redirected`

    @classmethod
    def of(cls, raw: bytes | None) -> "KernelCounts":
        if not raw:
            return cls(0, 0)
        entry = Connection.unpack(raw)
        return cls(entry.bytes, entry.passed, bool(entry.flags & CONNECTION_BROKEN), entry.skbs)


NO_COUNTS = KernelCounts(0, 0)


class Sample(NamedTuple):
    """What one full check saw; a change since the last one is activity."""
    client: KernelCounts
    upstream: KernelCounts
    client_acked: int
    upstream_acked: int


def ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


class Side:
    """One socket of a pair and what it had seen before the kernel took over."""
    __slots__ = ("sock", "fd", "key", "early", "consumed0", "received0", "state0", "written0", "fin_sent",
                 "paused", "pauses", "forwarded", "in_userspace", "entry", "kernel", "tcp")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.key = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        self.early = 0       # bytes drained and forwarded to the peer at registration
        self.consumed0 = 0   # bytes read from it before the relay (registration step 2)
        self.received0 = 0   # TCP_INFO bytes_received then
        self.state0 = 0      # TCP state then
        self.written0 = 0    # bytes written to it before the relay
        self.fin_sent = False
        self.paused = False
        self.pauses = 0      # times its bytes were kept on it for a slow reader
        self.forwarded = 0   # bytes kept on it while paused that we sent on (RELAY_CONTROL)
        self.in_userspace = False  # got its FIN before SOCK_MAP took it: drained by us
        self.entry: bytes | None = None          # its CONNECTION_MAP entry at the last check
        self.kernel = NO_COUNTS                  # the same, decoded
        self.tcp: TcpCounters | None = None      # TCP_INFO at the last full check

    def take_baselines(self) -> None:
        while True:  # bytes may arrive between the two reads; retry until none did
            before = TcpCounters.of(self.sock).received
            inq = ioctl_int(self.fd, SIOCINQ)
            now = TcpCounters.of(self.sock)
            if now.received == before:
                break
        self.consumed0, self.received0, self.state0 = now.received - inq, now.received, now.state
        self.written0 = now.acked + ioctl_int(self.fd, SIOCOUTQ)

    _SAVED = ("early", "consumed0", "received0", "state0", "written0", "in_userspace")

    def saved(self) -> dict:
        """What a worker that adopts the pair needs of this side (keeper.py)."""
        return {name: getattr(self, name) for name in self._SAVED}

    def restore(self, saved: dict) -> None:
        for name in self._SAVED:
            setattr(self, name, saved[name])

    def sent_fin(self) -> bool:
        """We shut this socket's sending side down (a FIN carried to it)."""
        return TcpCounters.of(self.sock).state in _FIN_SENT

    def may_hold_stranded_bytes(self) -> bool:
        """After its SOCK_MAP insertion: did bytes reach it that no verdict has seen?
        Bytes that arrive after the insertion run the verdict themselves. (SIOCINQ
        cannot tell: on a sockmap socket it counts only bytes kept for userspace.)"""
        return self.consumed0 != self.received0 or TcpCounters.of(self.sock).received != self.received0

    def written(self, tcp: TcpCounters) -> int:
        """Bytes the relay has put into this socket's write queue (acked first: a
        racing ACK can only make this low, never high)."""
        return tcp.acked + ioctl_int(self.fd, SIOCOUTQ) - self.written0

    def unread(self) -> bool:
        """Bytes wait in its receive queue that neither the verdict nor userspace took."""
        k = self.kernel
        return not self.in_userspace and k.redirected + k.passed < self.tcp.received - 1 - self.consumed0


class Pair:
    """Both sides, the pace of the checks, and the sleep between them."""
    __slots__ = ("client", "upstream", "woken", "_waiter", "interval", "last_activity", "last_check",
                 "sample", "quiet", "idle_due", "parked")

    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = Side(client), Side(upstream)
        self.woken = False   # epoll saw a FIN, a hang-up or an error on a side
        self._waiter: Waiter | None = None
        self.interval = 0.0         # until the next check
        self.last_activity = self.last_check = 0.0
        self.sample: Sample | None = None   # what the last full check saw
        self.quiet = False   # it found nothing queued, paused or waiting for a FIN
        self.idle_due = math.inf   # in the idle sweep: when the sweep wakes it for its idle limit
        self.parked = None   # parked in the idle sweep: the watch to resume (kernel_relay.py)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.client, self.upstream

    @property
    def keys(self) -> tuple[bytes, bytes]:
        return self.client.key, self.upstream.key

    def changed(self, key: bytes, entry: bytes | None) -> bool:
        """Whether `entry`, read from CONNECTION_MAP now, differs from the one the side with
        that key had at the last check (the idle sweep's baseline)."""
        return entry != (self.client.entry if key == self.client.key else self.upstream.entry)

    def directions(self):
        """(src, dst) for each direction still open toward dst."""
        return [(src, dst) for src, dst in ((self.client, self.upstream), (self.upstream, self.client))
                if not dst.fin_sent]

    def peer(self, side: Side) -> Side:
        return self.upstream if side is self.client else self.client

    @property
    def half_closed(self) -> bool:
        return self.client.fin_sent or self.upstream.fin_sent

    @property
    def finished(self) -> bool:
        return self.client.fin_sent and self.upstream.fin_sent

    def read_tcp(self) -> None:
        for side in self.sides:
            side.tcp = TcpCounters.of(side.sock)

    def park(self, task) -> None:
        """Hand the watch to the idle sweep (kernel_relay.py), keeping only what the sweep
        and a resumed watch need: it resumes woken, so its next check is a full one."""
        self.parked = task
        self.sample, self.quiet = None, False
        for side in self.sides:   # the sweep compares `entry`; a resumed check reads the rest again
            side.tcp, side.kernel = None, NO_COUNTS

    def wake(self) -> None:
        """From the hub (epoll): end the pair's current or next sleep."""
        self.woken = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.switch(None)

    def sleep(self, loop, seconds: float) -> bool:
        """Wait until woken or for seconds; True when woken. A timer and a Waiter are
        the least a greenlet can wait on: an Event with a timeout doubled the cost of an
        idle pair's check."""
        if not self.woken:
            timer = loop.timer(seconds)
            self._waiter = waiter = Waiter()
            timer.start(waiter.switch, None)
            try:
                waiter.get()
            finally:
                timer.close()
                self._waiter = None
        woken, self.woken = self.woken, False
        return woken


class StowedPair:
    """A parked pair that the master keeps, held as the master holds it (keeper.join: its
    fds and its packed state) and what the idle sweep compares: no socket objects, no
    sides, no owner. Thousands wait at once, and each Pair, its Sides, its task and its
    Connection held some 2.4 KiB. A wake rebuilds the pair from this, as a worker adopts
    one (kernel_relay.py). Of each CONNECTION_MAP entry it keeps a hash, which is all the
    sweep compares: an int of 36 bytes, not the entry's 89 (with 3,000 idle pairs, about
    0.1 KiB less worker RSS per pair)."""
    __slots__ = ("kept", "client_key", "upstream_key", "client_entry_hash", "upstream_entry_hash", "idle_due",
                 "last_activity", "limits")

    def __init__(self, pair: Pair, packed: bytes, limits):
        self.kept = keeper.join((pair.client.fd, pair.upstream.fd), packed)
        self.client_key, self.upstream_key = pair.keys
        self.client_entry_hash, self.upstream_entry_hash = hash(pair.client.entry), hash(pair.upstream.entry)
        self.idle_due, self.last_activity, self.limits = pair.idle_due, pair.last_activity, limits

    @property
    def keys(self) -> tuple[bytes, bytes]:
        return self.client_key, self.upstream_key

    def changed(self, key: bytes, entry: bytes | None) -> bool:
        return hash(entry) != (self.client_entry_hash if key == self.client_key else self.upstream_entry_hash)

    @property
    def fds(self) -> tuple[int, int]:
        return keeper.fds_of(self.kept)
