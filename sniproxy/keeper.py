"""Kernel-relayed pairs outlive their worker: the master keeps a copy of both
sockets of every pair the kernel relays, so a worker that exits (reloaded,
crashed, killed with SIGKILL) closes only its own copies, the kernel goes on
relaying, and the master hands the pair to a live worker, which takes over
watching it (half-closes, the end, max_queued, the idle limit, the log line).

Each worker has a SOCK_SEQPACKET socketpair with the master. Messages are a JSON
header, and after a NUL the pair's state, packed (pack()); the pair's two sockets go
as SCM_RIGHTS on "keep" and "adopt":
  worker -> master  {"op": "keep", "key": K} state  + client, upstream
  worker -> master  {"op": "drop", "key": K}      the pair ended: close the copies
  master -> worker  {"op": "adopt"} state           + client, upstream
A pair's sockets stay open while any copy does: a socket that must reset
(SO_LINGER 0) does so when the master closes the last copy on "drop".
"""
from __future__ import annotations

import array
import collections
import json
import logging
import os
import resource
import socket
import struct
import zlib

log = logging.getLogger("sniproxy.keeper")
_MAX_MESSAGE = 1 << 16
_FDS = array.array("i")
FD_HEADROOM = 512   # fds the master keeps for itself (workers' channels, logs, state, metrics)
SO_SNDBUFFORCE = 32
CHANNEL_BUFFER = 8 << 20   # doubled by the kernel: ~21,000 messages in flight each way (~770 bytes each)


# A pair's state is some 450 bytes of JSON, and the master holds one for every kernel
# pair. Deflated against this dictionary of what every state says, one takes about a
# quarter of that (~125 bytes, in ~15 us; what is left is its values): the master keeps
# it packed, and decodes one only to hand it on. A field missing here costs every stowed
# pair its bytes: the Chain's relay kind and "most", missing, took a worker 0.15 KiB more
# RSS per idle pair (their bytes crossed a size class). The dictionary is this image's
# own: an upgrade hands states over unpacked (master.py).
_DICTIONARY = json.dumps({
    "key": 0, "record": {"client": "127.0.0.1:0", "listener": "127.0.0.1:443", "name": "", "alpn": "-",
                         "backend": "127.0.0.1:443", "up": 0, "down": 0, "relay": "userspace", "outcome": "",
                         "started_at": 0.0, "most": 0},
    "sides": [{"early": 0, "consumed0": 0, "received0": 0, "state0": 1, "written0": 0, "in_userspace": False}] * 2,
}).encode()
_WBITS = -10   # raw deflate, a 1 KiB window: the dictionary and one state fit


def pack(state: dict) -> bytes:
    deflate = zlib.compressobj(6, zlib.DEFLATED, _WBITS, 1, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY)
    return deflate.compress(json.dumps(state).encode()) + deflate.flush()


def unpack(packed: bytes) -> dict:
    return json.loads(zlib.decompressobj(_WBITS, _DICTIONARY).decompress(packed))


# A kept pair, as the master holds it (and a worker one it stowed, kernel_pair.py): one
# bytes object, its two fds then its packed state (a tuple, a list and two ints beside
# it took more than the state itself).
_FD_PAIR = struct.Struct("ii")


def join(fds, packed: bytes) -> bytes:
    return _FD_PAIR.pack(*fds) + packed


def fds_of(kept: bytes) -> tuple[int, int]:
    return _FD_PAIR.unpack_from(kept)


def packed_of(kept: bytes) -> bytes:
    return kept[_FD_PAIR.size:]


def channel() -> tuple[socket.socket, socket.socket]:
    """(master's end, worker's end), made before the fork. Thousands of idle pairs reach
    the kernel relay together (one window after they connected), and each is a message: a
    send buffer of the default size (278 of them) kept the rest waiting in the worker,
    with a copy of both fds each (Link), until a worker near its file limit could keep no
    more (bench/results/2026-11-28-full4: 5,230 pairs at 9,650 idle connections)."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in (master, worker):
        force_sndbuf(end, CHANNEL_BUFFER)
    master.setblocking(False)
    return master, worker


def force_sndbuf(sock: socket.socket, size: int) -> None:
    """A send buffer of size, past net.core.wmem_max where we may (CAP_NET_ADMIN), else
    as large as that allows."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def send(sock: socket.socket, message: dict, fds: tuple[int, ...] = (), state: bytes = b"") -> None:
    """state: a pair's, packed."""
    socket.send_fds(sock, [json.dumps(message).encode() + b"\0" + state], list(fds))


def receive(sock: socket.socket) -> tuple[dict, bytes, list[int]] | None:
    """The next message, the packed state it carried (or b""), and its fds; None when
    none waits; EOFError when the other end closed."""
    try:   # not socket.recv_fds: before 3.12 it drops its flags, and would wait
        data, ancillary, _, _ = sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(2 * _FDS.itemsize), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    if not data:
        raise EOFError
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    header, _, state = data.partition(b"\0")
    return json.loads(header), state, list(fds)


class Link:
    """The worker's end. Messages go out in order; while the channel is full (the master
    busy) they wait here, with copies of their fds, and go once it drains: the worker's
    event loop never blocks on the master."""

    def __init__(self, sock: socket.socket, loop):
        sock.setblocking(False)
        self.sock = sock
        self.waiting: collections.deque = collections.deque()
        self._writable = loop.io(sock.fileno(), 2)

    def send(self, message: dict, fds: tuple[int, ...] = (), state: bytes = b"") -> None:
        if not self.waiting:
            try:
                return send(self.sock, message, fds, state)
            except BlockingIOError:
                pass
        copies = []   # the pair may end before they go
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError:   # our file limit: the message is not sent
            _close(copies)
            raise
        self.waiting.append((message, copies, state))
        if not self._writable.active:
            self._writable.start(self._flush)

    def _flush(self) -> None:
        while self.waiting:
            message, fds, state = self.waiting[0]
            try:
                send(self.sock, message, fds, state)
            except BlockingIOError:
                return
            except OSError:     # the master is gone, and its copies with it
                for _, fds, _ in self.waiting:
                    _close(fds)
                self.waiting.clear()
                break
            self.waiting.popleft()
            _close(fds)
        self._writable.stop()


class Keeper:
    """The master's side: the kept pairs, by worker, and the orphans of dead workers
    waiting for a live one. A pair's state stays packed (pack()), as it came: a quarter
    of its JSON text, itself a fraction of the objects it decodes to (thousands of idle
    pairs)."""

    def __init__(self):
        self.channels: dict[int, socket.socket] = {}          # worker pid -> master's end
        self.kept: dict[int, dict[int, bytes]] = {}   # pid -> key -> kept pair (join)
        self.orphans: list[bytes] = []
        self.refused = 0   # pairs it could not keep: their fds did not fit under its limit
        self.holding = 0   # kept sockets' fds open here
        self.messages = 0  # taken since the master last gave freed memory back
        self.capacity = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_HEADROOM

    def take_over(self, kept: list) -> None:
        """The pairs the image before this one kept (an upgrade): orphans until a worker is up."""
        self.orphans = [join(fds, pack(state)) for state, fds in kept]
        self.holding += 2 * len(self.orphans)

    def add_worker(self, pid: int, master_end: socket.socket) -> None:
        self.channels[pid] = master_end
        self.kept[pid] = {}

    def fds(self) -> list[int]:
        """The master's ends of the channels (what its loop waits on)."""
        return [s.fileno() for s in self.channels.values()]

    def kept_fds(self) -> list[int]:
        """Everything a new worker inherits from us and must close: the channels and
        the kept sockets (a copy in a worker would outlive the pair's end)."""
        return self.fds() + [fd for pairs in self.kept.values() for kept in pairs.values() for fd in fds_of(kept)] + \
            [fd for kept in self.orphans for fd in fds_of(kept)]

    def poll(self) -> None:
        """Take every waiting message of every worker."""
        for pid, sock in list(self.channels.items()):
            while True:
                try:
                    got = receive(sock)
                except (EOFError, OSError):
                    break      # the worker is gone: worker_exited() hands its pairs on
                if got is None:
                    break
                message, state, fds = got
                self.messages += 1
                if message["op"] == "keep" and (len(fds) != 2 or self.holding >= self.capacity):
                    # Truncated by our file limit, or close to it: the master needs fds of its own.
                    self.refused += 1
                    if self.refused == 1:
                        log.warning("cannot keep more kernel pairs (the master's file limit, %d): further "
                                    "ones end with their worker", self.capacity + FD_HEADROOM)
                    _close(fds)
                elif message["op"] == "keep":
                    self.kept[pid][message["key"]] = join(fds, state)
                    self.holding += 2
                elif message["op"] == "drop":
                    kept = self.kept[pid].pop(message["key"], None)
                    if kept is not None:
                        self._close(fds_of(kept))
                else:
                    _close(fds)

    def worker_exited(self, pid: int) -> None:
        """Its pairs still relay in the kernel: they wait for a live worker."""
        self.poll()   # its last keeps and drops first
        sock = self.channels.pop(pid, None)
        if sock is not None:
            sock.close()
        self.orphans += self.kept.pop(pid, {}).values()

    def hand_over(self, pids: list[int]) -> None:
        """Give the orphans to live workers, in turn."""
        while self.orphans and pids:
            kept = self.orphans.pop()
            fds, packed = fds_of(kept), packed_of(kept)
            state = unpack(packed)
            pid = pids[len(self.orphans) % len(pids)]
            try:
                send(self.channels[pid], {"op": "adopt"}, fds, packed)
            except BlockingIOError:   # its channel is full: the next turn hands it over
                self.orphans.append(kept)
                return
            except OSError as e:
                log.warning("handing a kernel pair to worker %d failed: %s; closing it", pid, e)
                self._close(fds)
                continue
            self.kept[pid][state["key"]] = kept
            log.info("worker %d adopted a kernel pair (client %s)", pid, state["record"].get("client", "?"))

    def orphan_states(self) -> list[tuple[dict, list[int]]]:
        """The orphans, decoded: what an upgrade passes on (take_over)."""
        return [(unpack(packed_of(kept)), list(fds_of(kept))) for kept in self.orphans]

    def _close(self, fds) -> None:
        _close(fds)
        self.holding -= len(fds)

    def close(self) -> None:
        for kept in [kept for pairs in self.kept.values() for kept in pairs.values()] + self.orphans:
            self._close(fds_of(kept))
        for sock in self.channels.values():
            sock.close()
        self.kept.clear(), self.orphans.clear(), self.channels.clear()


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
