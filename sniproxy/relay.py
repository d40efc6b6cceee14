"""The relay interface, and its userspace implementation.

A relay moves bytes between two connected sockets until both directions are
done, carrying half-close, and reports the byte counts. The kernel relay
(kernel_relay.py) is the other implementation of the same interface.
"""
from __future__ import annotations

import socket
import time
from typing import NamedTuple, Protocol

import gevent
import gevent.socket
from gevent.queue import SimpleQueue


class RelayResult(NamedTuple):
    up: int        # client -> upstream, after the first flight
    down: int      # upstream -> client
    outcome: str   # "done" | "idle_timeout" | "reset" | "slow_reader" | "error"


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


class BufferPool:
    """Large buffers lent only while bytes are in hand, so idle connections hold none."""

    def __init__(self, size: int = 256 * 1024):
        self.size = size
        self._free: SimpleQueue = SimpleQueue()

    def take(self) -> bytearray:
        return self._free.get_nowait() if not self._free.empty() else bytearray(self.size)

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


class UserspaceRelay:
    kind = "userspace"

    def __init__(self, buffer_size: int = 256 * 1024):
        self.pool = BufferPool(buffer_size)

    def relay(self, client, upstream, idle_timeout: float, half_closed_timeout: float | None = None) -> RelayResult:
        last = [time.monotonic()]
        counts = [0, 0]
        up = gevent.spawn(self._pump, client, upstream, last, counts, 0)
        down = gevent.spawn(self._pump, upstream, client, last, counts, 1)
        outcome = "done"
        while not (up.dead and down.dead):
            # Wake when either direction ends: a reset on one side ends both.
            live = [g for g in (up, down) if not g.dead]
            limit = idle_limit(idle_timeout, half_closed_timeout, half_closed=len(live) < 2)
            gevent.wait(live, timeout=max(0.05, last[0] + limit - time.monotonic()), count=1)
            if any(g.dead and g.value is False for g in (up, down)):
                outcome = "reset"
                break
            limit = idle_limit(idle_timeout, half_closed_timeout, half_closed=up.dead or down.dead)
            if time.monotonic() - last[0] >= limit and not (up.dead and down.dead):
                outcome = "idle_timeout"
                break
        gevent.killall((up, down))
        return RelayResult(counts[0], counts[1], outcome)

    def _pump(self, src, dst, last, counts, index) -> bool:
        """Copy src to dst until EOF, then half-close dst. False if either side failed."""
        fd = src.fileno()
        try:
            while True:
                gevent.socket.wait_read(fd)
                buf = self.pool.take()
                try:
                    n = src.recv_into(buf)
                    if not n:
                        break
                    dst.sendall(memoryview(buf)[:n])
                finally:
                    self.pool.give(buf)
                counts[index] += n
                last[0] = time.monotonic()
            dst.shutdown(socket.SHUT_WR)
        except OSError:          # a reset is an outcome, not a worker error
            return False
        return True

    def close(self) -> None:
        pass

