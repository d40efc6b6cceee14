"""The kernel relay: bytes of a registered pair flow through the SK_SKB verdict
in bpf/relay.c and never reach userspace; userspace only registers the pair,
carries half-closes, bounds the kernel's queue, and notices the end.

With a Handoff, a pair starts in the userspace relay, which stops with no byte
in hand once the handoff is due (bytes moved, or age); registration follows.
Short exchanges end before that and never touch the maps: registering and
removing a pair costs the worker more than relaying a few KiB.

Registration (nothing lost, nothing reordered):
 1. Drain each socket's receive queue in userspace and forward it to the peer
    with send_all. These are early bytes sitting behind the first flight (or
    sent by the backend at accept). The verdict hands over whole skbs, so a
    partially read skb would be replayed from its start (measured: duplicated
    bytes, then a stall); an empty queue has no partial skb. Forwarding them
    first puts them in the peer's write queue ahead of anything redirected.
 2. Take baselines from TCP_INFO: bytes userspace consumed from each socket
    (bytes_received - SIOCINQ) and bytes written to each (bytes_acked +
    SIOCOUTQ, which counts the first flight and step 1).
 3. CONNECTION_MAP both ways, then both sockets into SOCK_TARGETS (no
    programs), then into SOCK_MAP (the verdict). The verdict redirects through
    SOCK_TARGETS, so its target exists before any verdict runs; a redirect to a
    socket not in the map would drop bytes the sender already saw ACKed.
 4. Kick each socket that got bytes after step 1 (SO_RCVLOWAT): bytes that
    arrived between step 1 and step 3 wait in the receive queue until something
    runs the verdict; this runs it now, in order, ahead of later segments.
    TCP_INFO's bytes_received tells whether any arrived; later ones run the
    verdict themselves.

A socket that already got its FIN cannot enter a sockmap; such a pair is
relayed in userspace (UserspaceRelay), or, when only the last insertion
failed, its finished direction is drained to EOF here.

Afterwards the relay is idle in userspace: one epoll per KernelRelay watches
only EPOLLRDHUP|EPOLLHUP|EPOLLERR (edge-triggered), which data wakeups do not
match, and each pair checks its counters on an adaptive timer: half-closes are
carried once TCP_INFO shows the peer's write queue holds everything, and a
direction whose reader lags by more than max_queued is paused through
RELAY_CONTROL (bpf/relay.c) until the reader catches up.

A pair quiet for MAX_CHECK_INTERVAL stops checking itself and joins the idle
sweep: once a second, one read of their CONNECTION_MAP entries (a batch read of
the whole map once they are many) wakes those whose entries changed. Thousands
of idle pairs then cost one pass a second, where each cost a timer, a greenlet
switch and a check.
"""
from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import logging
import math
import os
import select
import socket
import struct
import time
from functools import partial

import gevent
import gevent.monkey
from gevent.hub import Waiter

from .bpfsys import PinnedMap
from .relay import Handoff, RelayResult, UserspaceRelay, idle_limit, raw_socket, send_all, wait_for

log = logging.getLogger("sniproxy.relay")

SO_COOKIE = 57
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
SIOCINQ, SIOCOUTQ = 0x541B, 0x5411
_TCP_INFO_SIZE = 232
_TCP_ESTABLISHED, _TCP_CLOSE = 1, 7
# States after a FIN arrived (TCP_CLOSE counts when no error is pending:
# a socket that finished both FINs while we held it ends there).
_FIN_RECEIVED = {6, 8, 9, 11}  # TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING
_CONNECTION = struct.Struct("<QQQQI4x")  # struct connection: peer cookie, bytes, skbs, passed, direction
DIRECTION_UP, DIRECTION_DOWN = 1, 2       # enum relay_direction: client->upstream, upstream->client
_CONTROL = struct.Struct("<IIQ")       # struct relay_control: mode, pad, forwarded
MODE_PAUSED, MODE_RESUMING = 1, 2
_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL = 324, 1  # x86_64 syscall number
_DRAIN_CHUNK = 1 << 20

MIN_CHECK_INTERVAL = 0.002
MAX_CHECK_INTERVAL = 1.0   # idle pairs: the bound on reaction to a burst after idleness
DRAIN_CHECK_INTERVAL = 0.02  # while waiting for a queue to drain (FIN or pause)
SWEEP_BATCH_FROM = 256     # idle pairs from which one batch read beats two lookups each


def _membarrier_global() -> None:
    if ct.CDLL(None, use_errno=True).syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        raise OSError(ct.get_errno(), "membarrier")


def _wait_for_rcu_readers() -> None:
    """membarrier(GLOBAL) is synchronize_rcu(); it blocks, so in a pool thread."""
    gevent.get_hub().threadpool.apply(_membarrier_global)


class TcpCounters:
    __slots__ = ("state", "acked", "received")

    def __init__(self, sock: socket.socket):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        self.state = info[0]
        self.acked, self.received = struct.unpack_from("<QQ", info, 120)  # tcpi_bytes_acked, _received


def _recv_nowait(sock: socket.socket) -> bytes | None:
    """Up to _DRAIN_CHUNK bytes waiting on sock, or None when none wait (never blocks,
    even in a gevent worker)."""
    try:
        return raw_socket(sock).recv(_DRAIN_CHUNK, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def _ioctl_int(fd: int, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]


def _kick(sock: socket.socket) -> None:
    """Run the verdict over whatever waits in the receive queue."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class _Side:
    """One socket of a pair and what it had seen before the kernel took over."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.key = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
        self.early = 0       # bytes drained and forwarded to the peer at registration
        self.consumed0 = 0   # bytes read from it before the relay (step 2)
        self.received0 = 0   # TCP_INFO bytes_received at step 2
        self.state0 = 0      # TCP state at step 2
        self.written0 = 0    # bytes written to it before the relay (step 2)
        self.fin_sent = False
        self.paused = False
        self.pauses = 0      # times its bytes were kept on it for a slow reader
        self.forwarded = 0   # bytes kept on it while paused that we sent on (RELAY_CONTROL)
        self.in_userspace = False  # got its FIN before SOCK_MAP took it: drained by us

    def take_baselines(self) -> None:
        while True:  # bytes may arrive between the two reads; retry until none did
            before = TcpCounters(self.sock).received
            inq = _ioctl_int(self.fd, SIOCINQ)
            now = TcpCounters(self.sock)
            if now.received == before:
                break
        self.consumed0, self.received0, self.state0 = now.received - inq, now.received, now.state
        self.written0 = now.acked + _ioctl_int(self.fd, SIOCOUTQ)

    def may_hold_stranded_bytes(self) -> bool:
        """After its SOCK_MAP insertion: did bytes reach it that no verdict has seen?
        Bytes that arrive after the insertion run the verdict themselves. (SIOCINQ
        cannot tell: on a sockmap socket it counts only bytes kept for userspace.)"""
        return self.consumed0 != self.received0 or TcpCounters(self.sock).received != self.received0

    def written(self, counters: TcpCounters) -> int:
        """Bytes the relay has put into this socket's write queue (acked first: a
        racing ACK can only make this low, never high)."""
        return counters.acked + _ioctl_int(self.fd, SIOCOUTQ) - self.written0


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket):
        self.client, self.upstream = _Side(client), _Side(upstream)
        self.woken = False   # epoll saw a FIN, a hang-up or an error on a side
        self._waiter: Waiter | None = None

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


def _counts_of(raw: bytes | None) -> tuple[int, int]:
    """(bytes redirected, bytes kept while paused) from a CONNECTION_MAP entry."""
    if not raw:
        return 0, 0
    _, redirected, _, passed, _ = _CONNECTION.unpack(raw)
    return redirected, passed


class KernelRelay:
    kind = "kernel"

    def __init__(self, pin_path: str, *, max_queued: int = 64 << 20, sndbuf: int = 32 << 20,
                 handoff: Handoff | None = None):
        self.max_queued, self.sndbuf, self.handoff = max_queued, sndbuf, handoff
        self._userspace = UserspaceRelay()
        self._maps: list[PinnedMap] = []
        try:
            self.sock_map, self.sock_targets, self.connections, self.control = (
                self._open(os.path.join(pin_path, name))
                for name in ("SOCK_MAP", "SOCK_TARGETS", "CONNECTION_MAP", "RELAY_CONTROL"))
        except BaseException:
            self.close()
            raise
        # The real epoll: gevent's patched select module has none.
        self._epoll = gevent.monkey.get_original("select", "epoll")()
        self._pairs_by_fd: dict[int, _Pair] = {}
        self.wakeups = 0  # epoll deliveries: stays small however many bytes flow
        self.pauses = 0   # times a direction was paused for a slow reader
        self.checks = 0   # times a pair's counters were read (see _watch)
        self.sweeps = 0   # passes of the idle sweep (see _sweep)
        self._idle: dict[_Pair, tuple[bytes | None, bytes | None]] = {}  # CONNECTION_MAP entries when it went idle
        self._loop = gevent.get_hub().loop
        self._watcher = self._loop.io(self._epoll.fileno(), 1)
        self._watcher.start(self._on_epoll)
        self._sweeper = self._loop.timer(MAX_CHECK_INTERVAL, MAX_CHECK_INTERVAL)

    def _open(self, path: str) -> PinnedMap:
        m = PinnedMap.open(path)
        self._maps.append(m)
        return m

    def _sweep(self) -> None:
        """Wake the idle pairs whose CONNECTION_MAP entries changed: the verdict relayed
        or kept bytes for them. A FIN or a reset wakes a pair through epoll instead."""
        self.sweeps += 1
        try:
            # The batch reads every worker's entries: worth it only for many idle pairs.
            lookup = self.connections.lookup_all().get if len(self._idle) >= SWEEP_BATCH_FROM \
                else self.connections.lookup
            changed = [pair for pair, before in self._idle.items()
                       if (lookup(pair.client.key), lookup(pair.upstream.key)) != before]
        except OSError as e:   # then every idle pair checks itself once
            log.warning("idle sweep failed: %s", e)
            changed = list(self._idle)
        for pair in changed:
            self._leave_idle(pair)
            pair.wake()

    def _enter_idle(self, pair: _Pair, entries: tuple[bytes | None, bytes | None]) -> None:
        self._idle[pair] = entries
        if not self._sweeper.active:
            self._sweeper.start(self._sweep)

    def _leave_idle(self, pair: _Pair) -> None:
        if self._idle.pop(pair, None) is not None and not self._idle:
            self._sweeper.stop()

    def _on_epoll(self) -> None:
        for fd, _ in self._epoll.poll(0):
            self.wakeups += 1
            pair = self._pairs_by_fd.get(fd)
            if pair is not None:
                pair.wake()

    # -- registration -------------------------------------------------------

    def _size_buffers(self, sock: socket.socket) -> None:
        # The redirect kworker backs off when the target's send buffer is half
        # full, so relayed sockets need large ones. The receive buffer stays
        # autotuned: the verdict empties it at once, and all a large one adds is
        # what a pause keeps for userspace to forward (measured: no faster).
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self.sndbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)

    @staticmethod
    def _drain_into(src: _Side, dst: _Side) -> None:
        """Step 1: empty src's receive queue into dst. Stops when a read came back
        short (the queue was empty then), so no skb is left partially read."""
        while True:
            data = _recv_nowait(src.sock)
            if data is None:
                return
            if data:
                send_all(dst.sock, data)
                src.early += len(data)
            if len(data) < _DRAIN_CHUNK:
                return

    def _register(self, pair: _Pair) -> bool:
        """Hand the pair to the kernel; False when it cannot take it (a socket is
        no longer ESTABLISHED: sockmaps refuse it) and nothing is left in the maps."""
        c, u = pair.client, pair.upstream
        for side in (c, u):
            self._size_buffers(side.sock)
        self._drain_into(c, u)
        self._drain_into(u, c)
        for side in (c, u):
            side.take_baselines()
        if any(side.state0 != _TCP_ESTABLISHED for side in (c, u)):
            return False
        for src, dst, direction in ((c, u, DIRECTION_UP), (u, c, DIRECTION_DOWN)):
            self.connections.update(src.key, _CONNECTION.pack(int.from_bytes(dst.key, "little"), 0, 0, 0, direction))
        # A FIN may still arrive before an insertion. Until the first SOCK_MAP
        # insertion no verdict runs, so backing out is clean.
        try:
            for sockets, side in ((self.sock_targets, c), (self.sock_targets, u), (self.sock_map, c)):
                sockets.update(side.key, struct.pack("<Q", side.fd))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._forget_sockets(pair)
            return False
        try:
            self.sock_map.update(u.key, struct.pack("<Q", u.fd))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # The upstream got its FIN: everything it will send is in its
            # receive queue. c's verdict already runs, so finish u -> c here.
            u.in_userspace = True
        for side in (c, u):
            self._pairs_by_fd[side.fd] = pair
            self._epoll.register(side.fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR | select.EPOLLET)
            if side.in_userspace:
                self._drain_into(side, c if side is u else u)
            elif side.may_hold_stranded_bytes():
                _kick(side.sock)
        return True

    def _forget_sockets(self, pair: _Pair) -> None:
        for side in (pair.client, pair.upstream):
            for m in (self.sock_map, self.sock_targets, self.control):
                m.delete(side.key)

    def _unregister(self, pair: _Pair, finished: bool) -> tuple[tuple[int, int], tuple[int, int]]:
        """Remove the pair everywhere; return (up, down) since registration, and of
        those, (up, down) as the verdict counted them.
        A finished pair (both FINs carried) receives nothing more, and closing a
        socket removes it from every sockmap, so only its CONNECTION_MAP entries
        go: no side is paused then (a FIN is carried only after a resume, which
        removes the RELAY_CONTROL entry)."""
        self._leave_idle(pair)
        if not finished:
            self._forget_sockets(pair)
        totals, redirected = [], []
        for side in (pair.client, pair.upstream):
            if self._pairs_by_fd.pop(side.fd, None) is not None:
                try:
                    self._epoll.unregister(side.fd)
                except OSError:
                    pass
            raw = self.connections.pop(side.key)
            redirected.append(_CONNECTION.unpack(raw)[1] if raw else 0)
            totals.append(side.early + side.forwarded + redirected[-1])
        return (totals[0], totals[1]), (redirected[0], redirected[1])

    # -- the life of a pair -------------------------------------------------

    def start(self, client: socket.socket, upstream: socket.socket, idle_timeout: float,
              half_closed_timeout: float | None, on_done):
        """With a handoff, the pair starts in the userspace relay, which stops (with no
        byte in hand) once the handoff is due; a short exchange ends there. The kernel
        phase runs in a greenlet of its own: it waits on its pair's counters."""
        job = (client, upstream, idle_timeout, half_closed_timeout, on_done, time.monotonic())
        if self.handoff is None:
            return self._handed_off(job, RelayResult(0, 0, "handoff"))
        return self._userspace.start(client, upstream, idle_timeout, half_closed_timeout,
                                     partial(self._handed_off, job), self.handoff)

    def _handed_off(self, job: tuple, before: RelayResult) -> None:
        if before.outcome == "handoff":
            gevent.spawn(self._in_kernel, before, *job)
        else:
            job[4](before)   # on_done

    def _in_kernel(self, before: RelayResult, client: socket.socket, upstream: socket.socket,
                   idle_timeout: float, half_closed_timeout: float | None, on_done, started: float) -> None:
        first_check = MIN_CHECK_INTERVAL
        moved = before.up + before.down
        if self.handoff is not None and moved < self.handoff.bytes:
            # Handed off by age: a quiet pair, checked first at the pace its rate so far
            # allows, as _watch paces any pair. Checking thousands of idle pairs from
            # MIN_CHECK_INTERVAL on kept the worker busy and registrations behind.
            first_check = self._check_interval(moved / max(time.monotonic() - started, 1e-3), 0)
        try:
            result = self._relay_in_kernel(client, upstream, idle_timeout, half_closed_timeout, first_check)
        except Exception:  # noqa: BLE001 - the connection must still end
            log.exception("kernel relay failed")
            result = RelayResult(0, 0, "error", self.kind)
        on_done(result._replace(up=result.up + before.up, down=result.down + before.down))

    def relay(self, client: socket.socket, upstream: socket.socket, idle_timeout: float,
              half_closed_timeout: float | None = None) -> RelayResult:
        return wait_for(self.start, client, upstream, idle_timeout, half_closed_timeout)

    def _relay_in_kernel(self, client: socket.socket, upstream: socket.socket, idle_timeout: float,
                         half_closed_timeout: float | None, first_check: float = MIN_CHECK_INTERVAL) -> RelayResult:
        pair = _Pair(client, upstream)
        outcome = "error"
        try:
            if not self._register(pair):
                # Too late for the kernel: a short exchange that already half-closed.
                result = self._userspace.relay(client, upstream, idle_timeout, half_closed_timeout)
                return result._replace(up=result.up + pair.client.early, down=result.down + pair.upstream.early)
            outcome = self._watch(pair, idle_timeout, half_closed_timeout, first_check)
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                outcome = "reset"            # a peer went away: an outcome, not a fault
            else:
                log.warning("kernel relay failed: %s", e, exc_info=True)
                outcome = "error"
        finally:
            (up, down), (kernel_up, kernel_down) = self._unregister(pair, finished=outcome == "done")
        if pair.client.pauses or pair.upstream.pauses:
            log.debug("kernel relay paused up %d, down %d times (%d/%d bytes kept for userspace)",
                      pair.client.pauses, pair.upstream.pauses, pair.client.forwarded, pair.upstream.forwarded)
        return RelayResult(up, down, outcome, self.kind, kernel_up, kernel_down)

    def _check_interval(self, rate: float, queued: int) -> float:
        """How soon to check again so that, at this rate (bytes/s), the kernel's queue
        cannot grow past max_queued before the check; at most MAX_CHECK_INTERVAL."""
        headroom = max(self.max_queued - queued, 0)
        return min(max(headroom / (2 * rate), MIN_CHECK_INTERVAL), MAX_CHECK_INTERVAL) if rate > 0 \
            else MAX_CHECK_INTERVAL

    def _watch(self, pair: _Pair, idle_timeout: float, half_closed_timeout: float | None,
               first_check: float) -> str:
        c, u = pair.client, pair.upstream
        now = time.monotonic()
        last_activity, last_check = now, now
        last_sample = None
        interval = first_check
        quiet = False  # the last full check found nothing queued, paused or waiting for a FIN
        while True:
            woken = pair.sleep(self._loop, interval)
            self._leave_idle(pair)
            self.checks += 1
            now = time.monotonic()
            limit = idle_limit(idle_timeout, half_closed_timeout, half_closed=c.fin_sent or u.fin_sent)
            # The verdict's counts first: read after TCP_INFO, bytes redirected in
            # between would look queued and could pause a direction for nothing.
            entries = (self.connections.lookup(c.key), self.connections.lookup(u.key))
            kernel = {c: _counts_of(entries[0]), u: _counts_of(entries[1])}  # (redirected, passed)
            if quiet and not woken and (kernel[c], kernel[u]) == last_sample[:2]:
                # Nothing redirected since then: no queue can have grown, and a FIN or a
                # reset would have woken the pair through epoll. Idle pairs end here.
                if now - last_activity >= limit:
                    return "idle_timeout"
                last_check = now
                interval = min(interval * 2, MAX_CHECK_INTERVAL)
                if interval == MAX_CHECK_INTERVAL:
                    # Quiet a while: the idle sweep watches its entries from now on (bytes
                    # redirected since they were read show there), and its own timer waits
                    # only for the idle limit.
                    self._enter_idle(pair, entries)
                    interval = math.inf
                interval = max(min(interval, last_activity + limit - now), MIN_CHECK_INTERVAL)
                continue
            counters = {side: TcpCounters(side.sock) for side in (c, u)}

            for side in (c, u):
                if counters[side].state == _TCP_CLOSE:
                    err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self._mirror_reset(u if side is c else c)
                        return "reset"

            worst_queued, waiting = 0, False
            for src, dst in ((c, u), (u, c)):
                if dst.fin_sent:
                    continue
                redirected, passed = kernel[src]
                delivered = redirected + src.forwarded
                # Queued in the kernel toward dst and not yet in dst's write queue:
                # the part no socket buffer bounds (the write queue is sndbuf-bounded).
                queued = delivered - dst.written(counters[dst])
                worst_queued = max(worst_queued, queued)
                if not src.paused and queued > self.max_queued:
                    self._pause(src)
                elif src.paused and queued <= self.max_queued // 2:
                    try:
                        with gevent.Timeout(limit):
                            self._resume(src, dst)
                    except gevent.Timeout:
                        return "idle_timeout"  # the reader stopped reading altogether
                waiting |= src.paused
                state = counters[src].state
                if src.paused or not (state in _FIN_RECEIVED or state == _TCP_CLOSE):
                    continue
                waiting = True
                # bytes_received counts the FIN's sequence number too.
                if not src.in_userspace and redirected + passed < counters[src].received - 1 - src.consumed0:
                    _kick(src.sock)  # bytes still waiting in src's receive queue
                elif passed == src.forwarded and dst.written(counters[dst]) >= delivered:
                    # Everything src sent is in dst's write queue: the FIN goes behind it.
                    dst.sock.shutdown(socket.SHUT_WR)
                    dst.fin_sent = True
            if c.fin_sent and u.fin_sent:
                return "done"

            sample = (kernel[c], kernel[u], counters[c].acked, counters[u].acked)
            if last_sample is None:
                pass  # the first check keeps the pace it was given
            elif sample != last_sample:
                last_activity = now
                moved = sum(kernel[c]) + sum(kernel[u]) - sum(last_sample[0]) - sum(last_sample[1])
                rate = moved / max(now - last_check, 1e-6)
                interval = self._check_interval(rate, worst_queued) if rate > 0 else MIN_CHECK_INTERVAL
            elif now - last_activity >= limit:
                return "idle_timeout"
            else:
                interval *= 2  # idle pairs cost less and less
            last_sample, last_check = sample, now
            quiet = not waiting and worst_queued <= 0
            ceiling = DRAIN_CHECK_INTERVAL if waiting else MAX_CHECK_INTERVAL
            interval = min(max(interval, MIN_CHECK_INTERVAL), ceiling,
                           max(last_activity + limit - now, MIN_CHECK_INTERVAL))

    def _counts(self, side: _Side) -> tuple[int, int]:
        """(bytes redirected, bytes kept while paused) as the verdict counted them."""
        return _counts_of(self.connections.lookup(side.key))

    # -- backpressure: see RELAY_CONTROL in bpf/relay.c -------------------------

    def _pause(self, src: _Side) -> None:
        """Keep src's bytes on src: its receive buffer fills and TCP stops the sender.
        (Removing src from SOCK_MAP instead can drop an skb: a verdict already
        under way finds no program and drops.)"""
        self.control.update(src.key, _CONTROL.pack(MODE_PAUSED, 0, src.forwarded))
        # A verdict under way may still redirect one skb; after this, none will
        # until the resume, so the redirected count stands still.
        _wait_for_rcu_readers()
        src.paused = True
        src.pauses += 1
        self.pauses += 1

    def _resume(self, src: _Side, dst: _Side) -> None:
        """Send on what src kept, in order, then let the verdict relay again."""
        # Bytes redirected before the pause may still wait in dst's psock queue,
        # outside its write queue; what we send now must go behind them.
        redirected = self._counts(src)[0]
        while dst.written(TcpCounters(dst.sock)) < redirected + src.forwarded:
            gevent.sleep(0.001)
        self.control.update(src.key, _CONTROL.pack(MODE_RESUMING, 0, src.forwarded))
        while True:
            data = _recv_nowait(src.sock) or b""
            if data:
                send_all(dst.sock, data)
                src.forwarded += len(data)
                self.control.update(src.key, _CONTROL.pack(MODE_RESUMING, 0, src.forwarded))
            elif self._counts(src)[1] != src.forwarded:
                gevent.sleep(0.001)  # kept skbs still on their way into src's queue
            else:
                # A verdict that read the previous `forwarded` may still be
                # running and about to keep one more skb. Verdicts run under
                # RCU: once every reader in flight is done, equality holds for good.
                _wait_for_rcu_readers()
                if self._counts(src)[1] == src.forwarded:
                    break
        self.control.delete(src.key)
        src.paused = False

    @staticmethod
    def _mirror_reset(sock_side: _Side) -> None:
        # Closing with a zero linger sends RST: the other end learns of the reset.
        try:
            sock_side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ENOTCONN):
                raise

    def close(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            self._idle.clear()   # a pair still watched leaves nothing to stop afterwards
            sweeper.stop()
            sweeper.close()
            self._sweeper = None
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            watcher.stop()
            watcher.close()
            self._watcher = None
        if getattr(self, "_epoll", None) is not None:
            self._epoll.close()
            self._epoll = None
        for m in self._maps:
            m.close()
        self._maps.clear()
