"""The relay interface, and the chain that moves a pair from one relay to the next.

A relay moves bytes between two connected sockets until both directions are
done, carrying half-close, and reports the byte counts:

    handle = relay.start(client, upstream, limits, on_done)

start() returns at once. on_done(RelayResult) runs in the hub once the pair is
done; handle.cancel() stops the relay without it. The caller has sent the first
flight, and closes both sockets after on_done. The kinds: the userspace relay
(userspace_relay.py), the kernel relay (kernel_relay.py), and Chain, which starts
a pair in one relay and hands it to the next.
"""
from __future__ import annotations

import _socket
import socket
import time
from typing import Callable, NamedTuple, Protocol

import gevent.socket


class Limits(NamedTuple):
    idle: float                        # the most a pair may go without moving a byte
    half_closed: float | None = None   # once one direction is done, if shorter

    def idle_limit(self, half_closed: bool) -> float:
        if half_closed and self.half_closed is not None:
            return min(self.idle, self.half_closed)
        return self.idle


class RelayResult(NamedTuple):
    up: int        # client -> upstream, after the first flight
    down: int      # upstream -> client
    # "done" | "idle_timeout" | "reset" | "slow_reader" | "error", or, ending one
    # relay of a Chain: "handoff" (stopped for the next) | "declined" (could not take it)
    outcome: str
    kind: str = "userspace"  # which relay carried the connection's bulk
    kernel_up: int = 0       # of up and down, the bytes the verdict redirected;
    kernel_down: int = 0     # the rest went through userspace

    def after(self, before: "RelayResult") -> "RelayResult":
        """This result, counting the bytes an earlier relay of the same pair moved."""
        return self._replace(up=before.up + self.up, down=before.down + self.down)


class Handoff(NamedTuple):
    """When the first relay of a Chain stops for the next: once this many bytes
    moved, or the pair has lived this long, whichever comes first."""
    bytes: int
    after: float


class Progress(NamedTuple):
    """What a pair did in the relays of a Chain before the current one."""
    moved: int       # bytes, both directions
    seconds: float


class Handle(Protocol):
    def cancel(self) -> None:
        """Stop relaying; on_done is not called."""


OnDone = Callable[[RelayResult], None]


class Relay(Protocol):
    kind: str

    def start(self, client: socket.socket, upstream: socket.socket, limits: Limits, on_done: OnDone) -> Handle:
        ...

    def close(self) -> None:
        """The worker is leaving: release what the relay holds."""


class Chain:
    """Start each pair in `first`, which stops with outcome "handoff" once the
    handoff is due, at a point where no byte is in hand; `then` takes it from
    there. Short exchanges end in `first` and never touch `then`. A pair that
    `then` declines (it half-closed meanwhile, or the kernel's maps are full)
    goes back to `first`, for good."""

    def __init__(self, first, then, handoff: Handoff):
        self.first, self.then, self.handoff = first, then, handoff
        self.kind = then.kind

    def start(self, client, upstream, limits: Limits, on_done: OnDone, record: dict | None = None) -> "_Chained":
        chained = _Chained(self, client, upstream, limits, on_done, record)
        if self.handoff == (0, 0):   # `then` from the start
            chained.handed_off(RelayResult(0, 0, "handoff"))
        else:
            chained.run(self.first, chained.handed_off, handoff=self.handoff)
        return chained

    @property
    def live_pairs(self) -> int:
        return getattr(self.then, "live_pairs", 0)

    def close(self) -> None:
        self.then.close()
        self.first.close()


class _Chained:
    """One pair's way through a Chain: the relay that holds it now."""
    __slots__ = ("chain", "client", "upstream", "limits", "on_done", "record", "started", "handle", "stage")

    def __init__(self, chain: Chain, client, upstream, limits: Limits, on_done: OnDone, record: dict | None):
        self.chain, self.client, self.upstream, self.limits, self.on_done = chain, client, upstream, limits, on_done
        self.record = record   # the access-log record so far, for a pair that may end in another worker
        self.started = time.monotonic()
        self.handle = None
        self.stage = 0

    def run(self, relay, on_done: OnDone, **how) -> None:
        """Start relay on the pair; its handle is the one to cancel, unless its on_done
        already moved the pair on before start() returned."""
        stage = self.stage = self.stage + 1
        handle = relay.start(self.client, self.upstream, self.limits, on_done, **how)
        if self.stage == stage:
            self.handle = handle

    def handed_off(self, before: RelayResult) -> None:
        if before.outcome != "handoff":
            return self.on_done(before)
        moved = before.up + before.down
        # A pair handed off by age is quiet: the next relay may pace itself by the rate so far.
        by_age = moved < self.chain.handoff.bytes
        progress = Progress(moved, time.monotonic() - self.started) if by_age else None
        record = None if self.record is None else dict(   # what the log line says if it ends elsewhere
            self.record, up=self.record.get("up", 0) + before.up, down=before.down,
            started_at=time.time() - (time.monotonic() - self.started))
        self.run(self.chain.then, lambda result: self.declined(result.after(before)), before=progress, record=record)

    def declined(self, result: RelayResult) -> None:
        if result.outcome != "declined":
            return self.on_done(result)
        self.run(self.chain.first, lambda rest: self.on_done(rest.after(result)))

    def cancel(self) -> None:
        self.handle.cancel()


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
            view = view[raw.send(view, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            gevent.socket.wait_write(raw.fileno(), timeout, timeout_exc=socket.timeout("timed out"))
