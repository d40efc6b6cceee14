"""The userspace relay: recv into one buffer per worker, send on at once.

Every pair is moved by event-loop callbacks in the hub, so no greenlet waits
for a pair, and a wakeup moves only the direction it is for. What the reader
cannot take yet is copied out of the shared buffer, so idle pairs hold none.
With a Handoff (relay.Chain), it stops with its outcome ("fast", "chatty" or
"quiet") once that is due, at a point where no byte is in hand and neither side
has sent its FIN.

The worker's pairs are the same pairs in C (copypair.c), on the hub's libev
loop: a wakeup then never enters Python, in this relay and in the splice relay.
The ones here serve where copypair is not built or gevent's loop is not libev's core.
"""
from __future__ import annotations

import _socket
import logging
import math
import socket
import sys
import time

import gevent

from .relay import LEAVING, RATE_SPAN, SMALL_MESSAGE, Handoff, Limits, OnDone, RelayResult, raw_socket

try:
    from . import copypair   # the same pairs in C (copypair.c), where setup.py built them
except ImportError:
    copypair = None

log = logging.getLogger("sniproxy.relay")

_READ, _WRITE = 1, 2  # libev event masks
_NOWAIT = socket.MSG_DONTWAIT  # whatever the descriptor's own blocking mode


class _Direction:
    """Bytes from src to dst: what was read and not yet sent waits in `pending` (the
    bytes themselves, or for the splice relay how many wait in its pipe). It is its
    watcher's callback: a bound method and an argument tuple per watcher would cost
    more than its slot, in each of thousands of idle pairs."""
    __slots__ = ("pair", "src", "dst", "pending", "eof", "count", "reads", "watcher", "watched", "pipe")

    def __init__(self, pair: "UserspacePair", src: _socket.socket, dst: _socket.socket):
        self.pair, self.src, self.dst = pair, src, dst
        self.pending: memoryview | int | None = None
        self.pipe: tuple[int, int] | None = None   # the splice relay's (read end, write end)
        self.eof = False     # src sent its FIN (carried to dst once pending is empty)
        self.count = 0
        self.reads = 0       # reads that returned bytes: messages, for a Handoff's "chatty"
        self.watcher = self.watched = None   # the started watcher, and its event

    def __call__(self) -> None:
        self.pair._on_ready(self)


class UserspacePair:
    """Both directions of a pair. A direction reads while it holds nothing; holding
    bytes its reader cannot take yet, it waits for the reader's socket to become
    writable instead. One timer serves the idle limit and the handoff's window: it
    fires at the earlier of the two, and activity in between only moves a timestamp."""

    __slots__ = ("relay", "up", "down", "loop", "limits", "handoff", "handoff_due", "window_base", "window_reads",
                 "due_outcome", "last", "on_done", "timer")

    def __init__(self, relay: "UserspaceRelay", c: _socket.socket, u: _socket.socket, limits: Limits,
                 handoff: Handoff | None, on_done: OnDone):
        self.relay, self.on_done = relay, on_done
        self.up, self.down = _Direction(self, c, u), _Direction(self, u, c)
        self.loop = gevent.get_hub().loop
        self.limits, self.handoff = limits, handoff
        self.last = time.monotonic()
        self.handoff_due = self.last + handoff.after if handoff is not None else math.inf
        self.window_base = 0       # bytes moved before the current window
        self.window_reads = 0      # and reads made
        self.due_outcome = None    # the Handoff's outcome once it is due
        self.timer = None
        for d in (self.up, self.down):
            self._watch(d)
        self._set_timer(self.last)

    def _watch(self, d: _Direction) -> None:
        """Watch what d now waits for: dst to take the pending bytes, else bytes to read
        (nothing once it is finished: its FIN carried, nothing pending)."""
        wanted = _WRITE if d.pending is not None else None if d.eof else _READ
        if wanted == d.watched:
            return
        if d.watcher is not None:
            d.watcher.close()
            d.watcher = None
        if wanted is not None:
            d.watcher = self.loop.io((d.src if wanted == _READ else d.dst).fileno(), wanted)
            d.watcher.start(d)
        d.watched = wanted

    def _half_closed(self) -> bool:
        return self.up.eof or self.down.eof

    def _idle_due(self) -> float:
        return self.last + self.limits.idle_limit(self._half_closed())

    def _handoff_ready(self, now: float) -> str | None:
        """The outcome to stop with, once the handoff is due, at a point where no byte is
        in hand and neither side has sent its FIN. A window that ends busy starts the next."""
        up, down, handoff = self.up, self.down, self.handoff
        if handoff is None or up.eof or down.eof:
            return None
        if self.due_outcome is None:
            moved = up.count + down.count - self.window_base
            reads = up.reads + down.reads - self.window_reads
            age = now - (self.handoff_due - handoff.after)   # of the window
            if moved >= handoff.bytes or moved >= handoff.rate * max(age, RATE_SPAN):
                self.due_outcome = "fast"
            elif reads >= handoff.messages and moved <= reads * SMALL_MESSAGE:
                self.due_outcome = "chatty"
            elif now >= self.handoff_due:
                if moved <= handoff.quiet:
                    self.due_outcome = "quiet"
                else:                  # a busy window: judge the next one
                    self.window_base += moved
                    self.window_reads += reads
                    self.handoff_due = now + handoff.after
        return self.due_outcome if up.pending is None and down.pending is None else None

    def _set_timer(self, now: float) -> None:
        due = self._idle_due()
        if not self._half_closed() and self.handoff_due > now:
            due = min(due, self.handoff_due)   # once past, _on_ready hands off when nothing is in hand
        if self.timer is not None:
            self.timer.close()
        self.timer = self.loop.timer(max(due - now, 0.0))
        self.timer.start(self)

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
        if up.eof and down.eof and up.pending is None and down.pending is None:
            return self._end("done")
        if self.handoff is not None and (outcome := self._handoff_ready(self.last if moved else time.monotonic())):
            return self._end(outcome)
        self._watch(d)
        if not was_half_closed and (up.eof or down.eof) and self.limits.half_closed is not None:
            self._set_timer(time.monotonic())   # the half-closed limit may be the shorter one

    def _on_timer(self) -> None:
        now = time.monotonic()
        if now >= self._idle_due():
            return self._end("idle_timeout")
        if outcome := self._handoff_ready(now):
            return self._end(outcome)
        self._set_timer(now)   # woken early: activity, a busy window, or a byte in hand at the handoff

    __call__ = _on_timer   # the pair is its timer's callback (see _Direction)

    def leave(self) -> None:
        """The worker is leaving: stop with LEAVING at the next point with no byte in hand."""
        self.due_outcome = LEAVING
        self._on_timer()

    def _end(self, outcome: str) -> None:
        self.cancel()
        self.on_done(RelayResult(self.up.count, self.down.count, outcome, self.relay.kind))

    def cancel(self) -> None:
        for d in (self.up, self.down):
            if d.watcher is not None:
                d.watcher.close()
                d.watcher = d.watched = None
            d.pair = None   # no cycle left for the collector
        if self.timer is not None:
            self.timer.close()
            self.timer = None
        self.relay.pairs.discard(self)
        self.relay._release(self)


class UserspaceRelay:
    kind = "userspace"
    wants_record = False
    READS_PER_TURN = 8   # so that one busy direction cannot starve the other
    compiled = copypair is not None   # pairs in C (copypair.c) where they can be

    def __init__(self, buffer_size: int = 256 * 1024, pipes: tuple[int, int] = (0, 0)):
        """pipes: the splice relay's (size, how many empty ones to keep): a direction moves
        bytes through a pipe of that size instead of the buffer."""
        # One buffer per worker: bytes are sent on at once, and what the peer cannot
        # take yet is copied out, so idle connections hold no buffer.
        self.pairs: set[UserspacePair] = set()   # live ones: the worker may leave (leaving)
        self._copier = self._compiled(buffer_size, *pipes) if self.compiled else None
        self._buffer = memoryview(bytearray(buffer_size if self._copier is None else 0))
        self.read_size = buffer_size   # the most one read takes

    def _compiled(self, buffer_size: int, pipe_size: int, pool_size: int):
        """copypair's pairs on this thread's loop, where gevent runs it in libev through its
        compiled core (not its CFFI one, GEVENT_LOOP=libev-cffi); else None."""
        loop = gevent.get_hub().loop
        if copypair is None or type(loop).__module__ != "gevent.libev.corecext":
            return None
        core = sys.modules[type(loop).__module__]
        try:
            return copypair.Copier(loop.ptr, core.__file__, buffer_size, self.pairs, RelayResult, self.kind,
                                   pipe_size, pool_size)
        except OSError as e:   # a gevent whose core does not export libev 4: these pairs serve
            log.warning("the %s relay's pairs run interpreted: %s", self.kind, e)
            return None

    def start(self, client, upstream, limits: Limits, on_done: OnDone, handoff: Handoff | None = None,
              before=None, record: dict | None = None, tls: bool = False) -> UserspacePair:
        """before, record: what a Chain tells the relays whose pairs may end elsewhere; tls,
        what a connection tells a Chain (all unused here)."""
        if self._copier is not None:   # it holds the descriptors, which any socket object gives
            return self._copier.pair(client.fileno(), upstream.fileno(), limits.idle, limits.half_closed, handoff,
                                     on_done)
        client, upstream = raw_socket(client), raw_socket(upstream)
        pair = UserspacePair(self, client, upstream, limits, handoff, on_done)
        self.pairs.add(pair)
        return pair

    def leaving(self, which) -> None:
        """The worker is leaving: each pair that which(pair) picks (a Chain's, in a stage
        that moves LEAVING on) stops with that outcome at its next point with no byte in
        hand (at once when it holds none), and neither side has sent its FIN: the kernel
        relay takes no half-closed pair."""
        for pair in list(self.pairs):
            if pair.handoff is not None and which(pair):
                pair.leave()

    def _release(self, pair: UserspacePair) -> None:
        """The pair is done with the relay: what it held goes back."""

    def _move(self, d: _Direction) -> bool:
        """Move what can move now without waiting; True if anything did."""
        if d.pending is not None:
            try:
                self._flush(d)
            except BlockingIOError:
                return False
            if d.pending is None and d.eof:
                d.dst.shutdown(socket.SHUT_WR)
            return True      # a point with nothing in hand: where a Chain may hand the pair on
        if d.eof:
            return False
        moved = False
        for _ in range(self.READS_PER_TURN):
            try:
                n = self._read(d)
            except BlockingIOError:
                break
            moved = True
            if not n:
                d.eof = True
                d.dst.shutdown(socket.SHUT_WR)
                break
            d.count += n
            d.reads += 1
            if not self._forward(d, n) or n < self.read_size:
                break        # the reader is full, or the receive queue is empty now
        return moved

    # How a direction moves bytes: the splice relay moves them otherwise.

    def _read(self, d: _Direction) -> int:
        return d.src.recv_into(self._buffer, 0, _NOWAIT)

    def _forward(self, d: _Direction, n: int) -> bool:
        """Send on the n bytes just read; keep what dst cannot take. False when it kept some."""
        try:
            sent = d.dst.send(self._buffer[:n], _NOWAIT)
        except BlockingIOError:
            sent = 0
        if sent < n:
            d.pending = memoryview(bytes(self._buffer[sent:n]))
        return sent == n

    def _flush(self, d: _Direction) -> None:
        sent = d.dst.send(d.pending, _NOWAIT)
        d.pending = d.pending[sent:] if sent < len(d.pending) else None

    def close(self) -> None:
        pass
