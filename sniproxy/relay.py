"""The relay interface, and the chain that moves a pair from one relay to the next.

A relay moves bytes between two connected sockets until both directions are
done, carrying half-close, and reports the byte counts:

    handle = relay.start(client, upstream, limits, on_done)

start() returns at once. on_done(RelayResult) runs in the hub once the pair is
done; handle.cancel() stops the relay without it. The caller has sent the first
flight, and closes both sockets after on_done. The kinds: the userspace (copy)
relay (userspace_relay.py), the splice relay (splice_relay.py), the kernel relay
(kernel_relay.py), and Chain, which moves a pair from one to the next by what it
does, as relay.policy says.
"""
from __future__ import annotations

import _socket
import math
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
    # "done" | "idle_timeout" | "reset" | "slow_reader" | "error", or, ending one relay
    # of a Chain: "fast" | "chatty" | "quiet" (stopped for the next, see Handoff) | "declined"
    # | LEAVING, or STOWED
    outcome: str
    kind: str = "userspace"  # which relay carried the connection's bulk
    kernel_up: int = 0       # of up and down, the bytes the verdict redirected;
    kernel_down: int = 0     # the rest went through userspace


# The relay holds the pair alone from now on, and ends it without its owner: the pair
# no longer holds the owner's state (kernel_relay.py stows idle pairs the master keeps).
STOWED = "stowed"

# The worker is leaving for a successor (a reload, an upgrade): a Chain moves the pair
# to a relay that outlives it, the kernel's, where one is there (Chain.leaving).
LEAVING = "leaving"

SMALL_MESSAGE = 1024   # bytes a read averages at most in a chatty pair (see Handoff)


# The shortest span a rate is judged over: at the default relay.splice_rate a pair is fast
# after 64 MiB in its first second, not only after the 320 MiB of its whole window (a bulk
# stream's copy relay cost the proxy more than the kernel relay's remaining 15 GB).
RATE_SPAN = 1.0


class Handoff(NamedTuple):
    """When the relay holding a pair in a Chain stops it for the next one: with outcome
    "fast" once `bytes` moved within one window of `after` seconds, or as soon as the
    window so far moved `rate` bytes a second (over RATE_SPAN at least); "chatty" once it made
    `messages` reads within one, of SMALL_MESSAGE bytes or fewer on average (ping-pong);
    or "quiet" at the end of a window in which at most `quiet` bytes moved. A busier
    window starts the next. The default quiet (any count) makes `after` a plain age limit."""
    bytes: float
    after: float
    quiet: float = math.inf
    messages: float = math.inf
    rate: float = math.inf


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
    wants_record: bool   # start() takes the access-log record (a pair that may end in another worker)

    def start(self, client: socket.socket, upstream: socket.socket, limits: Limits, on_done: OnDone) -> Handle:
        ...

    def close(self) -> None:
        """The worker is leaving: release what the relay holds."""


class Stage(NamedTuple):
    """One relay of a Chain: when a pair leaves it, and where it goes next by outcome
    ("fast", "chatty", "quiet", or "declined" from a relay that could not take it)."""
    relay: "Relay"
    handoff: Handoff | None = None   # None: the pair stays to its end, unless declined
    moves: dict[str, str] = {}


class Chain:
    """A pair's way through several relays, as relay.policy sets it (worker.py). It
    starts in the stage named `first`; a stage stops with a Handoff's outcome at a point
    where no byte is in hand, and its moves name the next. A stage whose handoff is
    due at once (bytes <= 0) is passed straight through."""

    def __init__(self, stages: dict[str, Stage], first: str, on_move: Callable[[str], None] | None = None):
        self.stages, self.first = stages, first
        self.on_move = on_move   # told the name of each stage a pair moves to after the first
        self.is_leaving = False  # the worker is leaving: pairs move on LEAVING where a stage says

    @classmethod
    def of(cls, first, then, handoff: Handoff) -> "Chain":
        """`first` until the handoff, then `then`; a pair `then` declines (it half-closed
        meanwhile, or the kernel's maps are full) goes back to `first` for good. A pair
        still in `first` when the worker leaves goes to `then` if that is the kernel."""
        moves = {"fast": "then", "quiet": "then", **({LEAVING: "then"} if then.kind == "kernel" else {})}
        return cls({"first": Stage(first, handoff, moves),
                    "then": Stage(then, None, {"declined": "rest"}),
                    "rest": Stage(first)}, "first")

    def start(self, client, upstream, limits: Limits, on_done: OnDone, record: dict | None = None,
              tls: bool = False) -> "_Chained":
        """tls: the pair speaks TLS (its first flight was a ClientHello); a stage's moves
        may then send an outcome elsewhere, under the key "<outcome>:tls"."""
        chained = _Chained(self, client, upstream, limits, on_done, record, tls)
        chained.enter(self.first, None)
        return chained

    def leaving(self) -> None:
        """The worker is leaving: every pair in a stage that moves LEAVING on stops at its
        next point with no byte in hand, and moves there, instead of being cut at the
        graceful timeout. Pairs that begin from now on go there at once."""
        self.is_leaving = True
        names = {name for name, stage in self.stages.items() if LEAVING in stage.moves}
        for relay in self._relays(names):
            relay.leaving(lambda pair: isinstance(pair.on_done, _Chained) and pair.on_done.chain is self and
                          pair.on_done.name in names)

    def _relays(self, names=None) -> list:
        """The relays of the stages named (all by default), each once."""
        stages = [s for n, s in self.stages.items() if names is None or n in names]
        return list({id(s.relay): s.relay for s in stages}.values())

    def find(self, kind: str):
        """The chain's relay of that kind, or None."""
        return next((r for r in self._relays() if r.kind == kind), None)

    @property
    def live_pairs(self) -> int:
        return sum(getattr(r, "live_pairs", 0) for r in self._relays())

    def close(self) -> None:
        for relay in reversed(self._relays()):
            relay.close()


class _Chained:
    """One pair's way through a Chain: the relay that holds it now, and what the
    relays before it moved."""
    __slots__ = ("chain", "client", "upstream", "limits", "on_done", "record", "started", "handle", "turn", "so_far",
                 "most", "name", "tls")
    # Every connection passes through here, most of them through one relay only: what
    # the later ones need (the record's copy, the sums) is made only for them.

    def __init__(self, chain: Chain, client, upstream, limits: Limits, on_done: OnDone, record: dict | None,
                 tls: bool = False):
        self.chain, self.client, self.upstream, self.limits, self.on_done = chain, client, upstream, limits, on_done
        self.tls = tls
        self.record = record   # the access-log record so far, for a pair that may end in another worker
        self.started = time.monotonic()
        self.handle = None
        self.turn = 0
        self.so_far: RelayResult | None = None   # what the relays before moved
        self.most = -1     # the most bytes one relay moved: its kind is the pair's
        self.name = ""     # the stage that holds the pair

    def enter(self, name: str, progress: Progress | None) -> None:
        stage = self.chain.stages[name]
        if stage.handoff is not None and stage.handoff.bytes <= 0:
            return self.left(name, RelayResult(0, 0, "fast"))
        if self.chain.is_leaving and LEAVING in stage.moves and (self.so_far is None or
                                                                  self.so_far.outcome != "declined"):
            return self.left(name, RelayResult(0, 0, LEAVING))
        record = None
        if self.record is not None and stage.relay.wants_record:   # what the log line says if it ends elsewhere
            up, down = (self.so_far.up, self.so_far.down) if self.so_far is not None else (0, 0)
            record = dict(self.record, up=self.record.get("up", 0) + up, down=down,
                          started_at=time.time() - (time.monotonic() - self.started))
            if self.so_far is not None:   # whose kind the pair's is, unless this relay moves more
                record.update(relay=self.so_far.kind, most=self.most)
        # The relay's handle is the one to cancel, unless its on_done already moved the
        # pair on before start() returned.
        turn = self.turn = self.turn + 1
        self.name = name   # one relay holds the pair at a time: its on_done is this object
        handle = stage.relay.start(self.client, self.upstream, self.limits, self, handoff=stage.handoff,
                                   before=progress, record=record)
        if self.turn == turn:
            self.handle = handle

    def __call__(self, result: RelayResult) -> None:
        """The on_done of the relay that holds the pair (a closure per pair would cost
        more than this object's slot, for every parked pair)."""
        self.left(self.name, result)

    def left(self, name: str, result: RelayResult) -> None:
        moves = self.chain.stages[name].moves
        following = self.tls and moves.get(f"{result.outcome}:tls") or moves.get(result.outcome)
        moved = result.up + result.down
        if self.so_far is None:      # the first relay: the totals are its own
            total = result
            if result.outcome != "declined":
                self.most = moved
        else:
            kind = self.so_far.kind
            if moved >= self.most and result.outcome != "declined":
                self.most, kind = moved, result.kind
            total = RelayResult(self.so_far.up + result.up, self.so_far.down + result.down, result.outcome, kind,
                                result.kernel_up, result.kernel_down)
        self.so_far = total
        if following is None:
            return self.on_done(total)
        if self.chain.on_move is not None and following != name:
            self.chain.on_move(following)
        # A quiet pair: the next relay may pace itself by the rate so far.
        progress = Progress(total.up + total.down, time.monotonic() - self.started) \
            if result.outcome == "quiet" else None
        self.enter(following, progress)

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
