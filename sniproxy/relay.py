"""The relay interface, and its userspace implementation.

A relay moves bytes between two connected sockets until both directions are
done, carrying half-close, and reports the byte counts. The kernel relay
(kernel_relay.py) is the other implementation of the same interface.
"""
from __future__ import annotations

import _socket
import logging
import math
import socket
import time
from typing import NamedTuple, Protocol

import gevent
import gevent.socket
from gevent.event import AsyncResult

log = logging.getLogger("sniproxy.relay")


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
    __slots__ = ("src", "dst", "pending", "eof", "count", "read_key", "write_key", "watcher", "watched")

    def __init__(self, src: _socket.socket, dst: _socket.socket):
        self.src, self.dst = src, dst
        self.pending: memoryview | None = None
        self.eof = False     # src sent its FIN (carried to dst once pending is empty)
        self.count = 0
        self.read_key, self.write_key = (src.fileno(), _READ), (dst.fileno(), _WRITE)
        self.watcher = self.watched = None   # the started watcher, and its (fd, event)

    @property
    def finished(self) -> bool:
        return self.eof and self.pending is None

    def wanted(self) -> tuple[int, int]:
        """The (fd, event) it waits for: dst to take the pending bytes, else bytes to read."""
        return self.read_key if self.pending is None else self.write_key


class _Pair:
    """Both directions of a pair, moved by event-loop callbacks in the hub: no
    greenlet waits for a pair, and a wakeup moves only the direction it is for.
    A direction reads while it holds nothing; holding bytes its reader cannot
    take yet, it waits for the reader's socket to become writable instead. One
    timer serves the idle limit and the handoff: it fires at the earlier of the
    two, and activity in between only moves a timestamp."""

    __slots__ = ("relay", "up", "down", "loop", "idle_timeout", "half_closed_timeout", "handoff",
                 "handoff_due", "last", "on_done", "timer")

    def __init__(self, relay: "UserspaceRelay", c: _socket.socket, u: _socket.socket, idle_timeout: float,
                 half_closed_timeout: float | None, handoff: Handoff | None, on_done):
        self.relay, self.on_done = relay, on_done
        self.up, self.down = _Direction(c, u), _Direction(u, c)
        self.loop = gevent.get_hub().loop
        self.idle_timeout, self.half_closed_timeout, self.handoff = idle_timeout, half_closed_timeout, handoff
        self.last = time.monotonic()
        self.handoff_due = self.last + handoff.after if handoff is not None else math.inf
        self.timer = None
        for d in (self.up, self.down):
            self._watch(d)
        self._set_timer(self.last)

    def _watch(self, d: _Direction) -> None:
        """Watch what d now waits for, if that changed."""
        wanted = None if d.finished else d.wanted()
        if wanted == d.watched:
            return
        if d.watcher is not None:
            d.watcher.close()
            d.watcher = None
        if wanted is not None:
            d.watcher = self.loop.io(*wanted)
            d.watcher.start(self._on_ready, d)
        d.watched = wanted

    def _half_closed(self) -> bool:
        return self.up.eof or self.down.eof

    def _idle_due(self) -> float:
        return self.last + idle_limit(self.idle_timeout, self.half_closed_timeout, self._half_closed())

    def _handoff_ready(self, now: float) -> bool:
        """Due, and at a point where no byte is in hand and neither side has sent its FIN."""
        up, down, handoff = self.up, self.down, self.handoff
        return handoff is not None and not (up.eof or down.eof) and up.pending is None \
            and down.pending is None and (up.count + down.count >= handoff.bytes or now >= self.handoff_due)

    def _set_timer(self, now: float) -> None:
        due = self._idle_due()
        if not self._half_closed() and self.handoff_due > now:
            due = min(due, self.handoff_due)   # once past, _on_ready hands off when nothing is in hand
        if self.timer is not None:
            self.timer.close()
        self.timer = self.loop.timer(max(due - now, 0.0))
        self.timer.start(self._on_timer)

    def _on_ready(self, d: _Direction) -> None:
        up, down = self.up, self.down
        was_half_closed = up.eof or down.eof
        try:
            moved = self.relay._move(d)
        except OSError:          # a reset is an outcome, not a worker error
            return self._end("reset")
        except Exception:        # noqa: BLE001 - a bug must not leave a watcher firing forever
            log.exception("userspace relay failed")
            return self._end("error")
        if moved:
            self.last = time.monotonic()
        if up.finished and down.finished:
            return self._end("done")
        if self.handoff is not None and self._handoff_ready(time.monotonic()):
            return self._end("handoff")
        self._watch(d)
        if not was_half_closed and (up.eof or down.eof) and self.half_closed_timeout is not None:
            self._set_timer(time.monotonic())   # the half-closed limit may be the shorter one

    def _on_timer(self) -> None:
        now = time.monotonic()
        if now >= self._idle_due():
            return self._end("idle_timeout")
        if self._handoff_ready(now):
            return self._end("handoff")
        self._set_timer(now)   # woken early: there was activity, or a byte in hand at the handoff

    def _end(self, outcome: str) -> None:
        self.cancel()
        self.on_done(RelayResult(self.up.count, self.down.count, outcome))

    def cancel(self) -> None:
        for d in (self.up, self.down):
            if d.watcher is not None:
                d.watcher.close()
                d.watcher = d.watched = None
        if self.timer is not None:
            self.timer.close()
            self.timer = None


def wait_for(start, *args) -> RelayResult:
    """The blocking form of a relay's start(): run it and wait in this greenlet for
    its result. A greenlet killed while it waits takes the relay down with it."""
    done = AsyncResult()
    pair = start(*args, done.set)
    try:
        return done.get()
    except BaseException:
        if pair is not None:
            pair.cancel()
        raise


class UserspaceRelay:
    kind = "userspace"
    READS_PER_TURN = 8   # so that one busy direction cannot starve the other

    def __init__(self, buffer_size: int = 256 * 1024):
        # One buffer per worker: bytes are sent on at once, and what the peer cannot
        # take yet is copied out, so idle connections hold no buffer.
        self._buffer = memoryview(bytearray(buffer_size))

    def start(self, client, upstream, idle_timeout: float, half_closed_timeout: float | None,
              on_done, handoff: Handoff | None = None) -> _Pair:
        """Relay from the event loop; on_done(RelayResult) once both directions are
        done. With handoff, stop with outcome "handoff" once it is due, at a point
        where no byte is in hand and neither side has sent its FIN."""
        return _Pair(self, raw_socket(client), raw_socket(upstream), idle_timeout, half_closed_timeout,
                     handoff, on_done)

    def relay(self, client, upstream, idle_timeout: float, half_closed_timeout: float | None = None,
              handoff: Handoff | None = None) -> RelayResult:
        return wait_for(lambda *a: self.start(*a, handoff=handoff), client, upstream, idle_timeout,
                        half_closed_timeout)

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
