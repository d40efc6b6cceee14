"""The relay interface, and its userspace implementation.

A relay moves bytes between two connected sockets until both directions are
done, carrying half-close, and reports the byte counts. The kernel relay
(kernel_relay.py) is the other implementation of the same interface.
"""
from __future__ import annotations

import _socket
import math
import socket
import time
from typing import NamedTuple, Protocol

import gevent
import gevent.socket
from gevent.hub import Waiter


class RelayResult(NamedTuple):
    up: int        # client -> upstream, after the first flight
    down: int      # upstream -> client
    outcome: str   # "done" | "idle_timeout" | "reset" | "slow_reader" | "error" | "handoff"
    kind: str = "userspace"  # which relay carried the connection's bulk
    kernel_up: int = 0       # of up and down, the bytes the verdict redirected;
    kernel_down: int = 0     # the rest went through userspace


class Handoff(NamedTuple):
    """When a userspace relay stops for the kernel relay to take over: once this many
    bytes moved, or the pair has lived this long, whichever comes first."""
    bytes: int
    after: float


class Relay(Protocol):
    kind: str

    def relay(self, client: socket.socket, upstream: socket.socket, idle_timeout: float,
              half_closed_timeout: float | None = None) -> RelayResult:
        """Block the calling greenlet until both directions are done. The caller
        has sent the first flight and closes both sockets afterwards. Once one
        direction is done, half_closed_timeout (if shorter) replaces idle_timeout."""

    def close(self) -> None: ...


def idle_limit(idle_timeout: float, half_closed_timeout: float | None, half_closed: bool) -> float:
    """How long a pair may go without moving a byte."""
    if half_closed and half_closed_timeout is not None:
        return min(idle_timeout, half_closed_timeout)
    return idle_timeout


_READ, _WRITE = 1, 2  # libev event masks
_NOWAIT = socket.MSG_DONTWAIT  # whatever the descriptor's own blocking mode


def raw_socket(sock) -> _socket.socket:
    """sock's C socket, on which calls with MSG_DONTWAIT return at once even in a gevent
    worker: a gevent socket wraps one as `_sock` and waits on EAGAIN around it."""
    return sock if isinstance(sock, _socket.socket) else sock._sock


def send_all(sock, data, timeout: float | None = None) -> None:
    """Send all of data, waiting cooperatively while the send buffer is full (or the
    socket still connecting); socket.timeout after timeout seconds of one such wait."""
    raw, view = raw_socket(sock), memoryview(data)
    while view:
        try:
            view = view[raw.send(view, _NOWAIT):]
        except BlockingIOError:
            gevent.socket.wait_write(raw.fileno(), timeout, timeout_exc=socket.timeout("timed out"))


class _Direction:
    """Bytes from src to dst: what was read and not yet sent waits in `pending`."""
    __slots__ = ("src", "dst", "pending", "eof", "count", "read_key", "write_key")

    def __init__(self, src: _socket.socket, dst: _socket.socket):
        self.src, self.dst = src, dst
        self.pending: memoryview | None = None
        self.eof = False     # src sent its FIN (carried to dst once pending is empty)
        self.count = 0
        self.read_key, self.write_key = (src.fileno(), _READ), (dst.fileno(), _WRITE)

    @property
    def finished(self) -> bool:
        return self.eof and self.pending is None

    def wanted(self) -> tuple[int, int]:
        """The (fd, event) it waits for: dst to take the pending bytes, else bytes to read."""
        return self.read_key if self.pending is None else self.write_key


class _Readiness:
    """Waits in the calling greenlet until one of several descriptors is ready, or a
    deadline: one greenlet serves both directions of a pair. Watchers stay started
    while they are wanted, so that consecutive waits change nothing in epoll, and one
    timer serves every wait: it is moved only when a wait needs it earlier, and a
    wait woken early by it simply finds nothing ready."""

    def __init__(self):
        self.hub = gevent.get_hub()
        self._watchers: dict[tuple[int, int], object] = {}
        self._started: tuple[tuple[int, int], ...] = ()
        self._waiter: Waiter | None = None
        self._timer = None
        self._timer_due = math.inf

    def _on_ready(self, key) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.switch(key)

    def _on_timer(self) -> None:
        self._timer_due = math.inf
        self._on_ready(None)

    def wait(self, wanted: tuple[tuple[int, int], ...], deadline: float) -> tuple[int, int] | None:
        """The (fd, event) found ready, or None when woken by the timer (at the
        deadline, or earlier: the caller checks its clocks)."""
        if wanted != self._started:
            self._start(wanted)
        if deadline < self._timer_due:
            if self._timer is not None:
                self._timer.close()
            self._timer = self.hub.loop.timer(max(deadline - time.monotonic(), 0.0))
            self._timer.start(self._on_timer)
            self._timer_due = deadline
        self._waiter = Waiter(self.hub)
        try:
            return self._waiter.get()
        finally:
            self._waiter = None

    def _start(self, wanted) -> None:
        for key in self._started:
            if key not in wanted:
                self._watchers[key].stop()
        for key in wanted:
            if key not in self._started:
                watcher = self._watchers.get(key)
                if watcher is None:
                    watcher = self._watchers[key] = self.hub.loop.io(*key)
                watcher.start(self._on_ready, key)
        self._started = wanted

    def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.close()
        self._watchers.clear()
        self._started = ()
        if self._timer is not None:
            self._timer.close()
            self._timer, self._timer_due = None, math.inf


class UserspaceRelay:
    kind = "userspace"
    READS_PER_TURN = 8   # so that one busy direction cannot starve the other

    def __init__(self, buffer_size: int = 256 * 1024):
        # One buffer per worker: bytes are sent on at once, and what the peer cannot
        # take yet is copied out, so idle connections hold no buffer.
        self._buffer = memoryview(bytearray(buffer_size))

    def relay(self, client, upstream, idle_timeout: float, half_closed_timeout: float | None = None,
              handoff: Handoff | None = None) -> RelayResult:
        """With handoff, stop with outcome "handoff" once it is due, at a point where no
        byte is in hand and neither side has sent its FIN."""
        c, u = raw_socket(client), raw_socket(upstream)
        up, down = _Direction(c, u), _Direction(u, c)
        readiness = _Readiness()
        start = last = time.monotonic()
        handoff_due = start + handoff.after if handoff is not None else math.inf
        outcome = "done"
        ready = None  # nothing known yet: the first turn only waits
        try:
            while True:
                moved = False
                if ready is not None:
                    for d in (up, down):
                        if d.wanted() == ready:
                            moved |= self._move(d)
                now = time.monotonic()
                if moved:
                    last = now
                half_closed = up.eof or down.eof
                if half_closed and up.finished and down.finished:
                    break
                if handoff is not None and not half_closed and up.pending is None and down.pending is None \
                        and (up.count + down.count >= handoff.bytes or now >= handoff_due):
                    outcome = "handoff"
                    break
                idle_due = last + idle_limit(idle_timeout, half_closed_timeout, half_closed)
                if now >= idle_due:
                    outcome = "idle_timeout"
                    break
                wanted = (up.wanted(), down.wanted()) if not half_closed else \
                    tuple(d.wanted() for d in (up, down) if not d.finished)
                ready = readiness.wait(wanted, idle_due if half_closed else min(idle_due, handoff_due))
        except OSError:          # a reset is an outcome, not a worker error
            outcome = "reset"
        finally:
            readiness.close()
        return RelayResult(up.count, down.count, outcome)

    def _move(self, d: _Direction) -> bool:
        """Move what can move now without waiting; True if anything did."""
        if d.pending is not None:
            try:
                sent = d.dst.send(d.pending, _NOWAIT)
            except BlockingIOError:
                return False
            d.pending = d.pending[sent:] if sent < len(d.pending) else None
            if d.pending is None and d.eof:
                d.dst.shutdown(socket.SHUT_WR)
            return True
        if d.eof:
            return False
        moved = False
        for _ in range(self.READS_PER_TURN):
            try:
                n = d.src.recv_into(self._buffer, 0, _NOWAIT)
            except BlockingIOError:
                break
            moved = True
            if not n:
                d.eof = True
                d.dst.shutdown(socket.SHUT_WR)
                break
            d.count += n
            try:
                sent = d.dst.send(self._buffer[:n], _NOWAIT)
            except BlockingIOError:
                sent = 0
            if sent < n:
                d.pending = memoryview(bytes(self._buffer[sent:n]))
                break
            if n < len(self._buffer):
                break        # the receive queue is empty now
        return moved

    def close(self) -> None:
        pass
