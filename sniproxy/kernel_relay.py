"""The kernel relay: bytes of a registered pair flow through the SK_SKB verdict
in bpf/relay.c and never reach userspace; userspace only registers the pair,
carries half-closes, bounds the kernel's queue, and notices the end.

A pair reaches it from the userspace relay through a relay.Chain, with no byte
in hand: short exchanges end before that and never touch the maps, since
registering and removing a pair costs the worker more than relaying a few KiB.

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

The verdict also cuts bytes TCP delivers twice: a retransmitted segment that
overlaps bytes already received is queued whole, and the verdict is handed whole
skbs (see trim_old_bytes in bpf/relay.c).

A socket that already got its FIN cannot enter a sockmap, and full maps take no
pair: then the relay ends with outcome "declined" and the Chain carries on in
userspace. When only the last insertion failed, the finished direction is
drained to EOF here.

Afterwards the relay is idle in userspace: one epoll per KernelRelay watches
only EPOLLRDHUP|EPOLLHUP|EPOLLERR (edge-triggered), which data wakeups do not
match, and each pair (kernel_pair.py) checks its counters on an adaptive timer, in
named steps: a reset ends it; a direction whose reader lags by more than
max_queued is paused through RELAY_CONTROL (bpf/relay.c) until the reader
catches up; half-closes are carried once TCP_INFO shows the peer's write queue
holds everything; the pace of the next check follows the rate.

A pair moving batch_rate or more in small skbs (BATCH_BELOW) is batched: SO_RCVLOWAT
of batch_bytes on both sockets holds the verdict back until that many bytes wait (the
kernel runs it from the socket's data-ready, which the low-water mark gates), and one
timer every BATCH_FLUSH runs it over whatever waits on every batched pair. Unbatched,
the verdict runs for each skb, and each redirect queues the target's kworker: over
loopback a TLS origin's every 16 KiB record cost a switch to the kworker and back
(bench/results/2026-11-28-segments); batched, its download ran 1.3x faster
(bench/results/2026-11-28-batching).

A pair quiet for MAX_CHECK_INTERVAL stops checking itself and joins the idle
sweep: once a second, one read of their CONNECTION_MAP entries (a batch read of
the whole map once they are many) wakes those whose entries changed. Thousands
of idle pairs then cost one pass a second, where each cost a timer, a greenlet
switch and a check. Unless its idle limit is near, such a pair also parks: its
greenlet ends, the sweep watches the limit too, and a wake (the sweep, or epoll)
resumes the watch in a new greenlet. A parked pair holds no greenlet, no timer.
A parked pair that the master keeps (keeper.py) is stowed as the master holds it
(kernel_pair.StowedPair), and its Connection lets it go: a wake rebuilds the pair
as if adopted, and the worker ends it as it ends an adopted one (worker.py).
"""
from __future__ import annotations

import collections
import ctypes as ct
import errno
import logging
import math
import os
import select
import socket
import struct
import time
from functools import partial
from typing import Callable

import gevent
import gevent.monkey

from . import keeper
from .bpfsys import PinnedMap
from .kernel_abi import (CONNECTION_MAP, COOKIE, DIRECTION_DOWN, DIRECTION_UP, MODE_PAUSED, MODE_RESUMING,
                         RELAY_CONTROL, SOCK_MAP, SOCK_TARGETS, Connection, RelayControl)
from .kernel_pair import TCP_CLOSE, TCP_ESTABLISHED, KernelCounts, Pair, Sample, Side, StowedPair, TcpCounters
from .relay import STOWED, Limits, OnDone, Progress, RelayResult, raw_socket, send_all

log = logging.getLogger("sniproxy.relay")

_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL = 324, 1  # x86_64 syscall number
_DRAIN_CHUNK = 1 << 20

MIN_CHECK_INTERVAL = 0.002
BATCH_FLUSH = 0.002   # the longest a batched pair's bytes wait for the verdict
# Only pairs whose skbs average less are batched: over loopback a TLS origin's records
# arrive at 16-20 KiB an skb, and iperf3's 128 KiB writes at 43-64 KiB, where batching
# cost four bulk streams 17-24% (bench/results/2026-11-28-batching).
BATCH_BELOW = 32 << 10
MAX_CHECK_INTERVAL = 1.0   # idle pairs: the bound on reaction to a burst after idleness
DRAIN_CHECK_INTERVAL = 0.02  # while waiting for a queue to drain (FIN or pause)
SWEEP_BATCH_FROM = 256     # idle pairs from which one batch read beats two lookups each
SWEEP_CHUNK = 2048         # CONNECTION_MAP entries the batch read takes per loop turn (~1 ms)
WARN_INTERVAL = 60.0       # a warning that may repeat for every pair ("the maps are full") at most this often


def _membarrier_global() -> None:
    if ct.CDLL(None, use_errno=True).syscall(_SYS_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL, 0, 0) != 0:
        raise OSError(ct.get_errno(), "membarrier")


def _wait_for_rcu_readers() -> None:
    """membarrier(GLOBAL) is synchronize_rcu(); it blocks, so in a pool thread."""
    gevent.get_hub().threadpool.apply(_membarrier_global)


def _recv_nowait(sock: socket.socket) -> bytes | None:
    """Up to _DRAIN_CHUNK bytes waiting on sock, or None when none wait (never blocks,
    even in a gevent worker)."""
    try:
        return raw_socket(sock).recv(_DRAIN_CHUNK, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None


def _kick(sock: socket.socket) -> None:
    """Run the verdict over whatever waits in the receive queue."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class _Declined(Exception):
    """The kernel cannot take this pair; nothing of it is left in the maps."""


PARKED = "parked"   # _watch's outcome for a pair that left its greenlet for the idle sweep
MOVED = "moved"     # ... for one the registrar checked once: it goes on in a greenlet of its own


class _Task:
    """A pair's watch, and its handle: the greenlet that runs it, or while the pair is
    parked in the idle sweep, none, and what resuming it takes (held in slots: a parked
    pair costs what it keeps, and thousands wait at once)."""
    __slots__ = ("greenlet", "on_done", "relay", "pair", "limits", "kept", "adopted", "arrival")
    # kept: the pair's state as the master keeps it (keeper.pack), or None

    def __init__(self, on_done: OnDone):
        self.greenlet = None
        self.on_done = on_done   # None once cancelled
        self.relay = None   # set while parked, until resumed
        self.arrival = None   # waiting for the registrar: what start() was given

    def park(self, relay: "KernelRelay", pair: Pair, limits: Limits, kept: bytes | None, adopted: bool) -> None:
        self.greenlet = None
        self.relay, self.pair, self.limits, self.kept, self.adopted = relay, pair, limits, kept, adopted

    @property
    def parked(self) -> bool:
        return self.relay is not None

    def take_resume(self) -> Callable[..., RelayResult | None] | None:
        """The parked watch's resume, once: it takes the begin= of KernelRelay._run."""
        relay, self.relay = self.relay, None
        if relay is None:
            return None
        pair, limits, self.pair, self.limits = self.pair, self.limits, None, None
        return partial(relay._run, self, pair, limits, self.kept, self.adopted)

    def cancel(self) -> None:
        """End the watch without on_done. A kill raises GreenletExit where the watch
        waits, and its cleanup runs; a parked pair (or one whose resume has not run
        yet) is resumed to run the same cleanup."""
        self.arrival = self.on_done = None   # the registrar skips it, or ends it at its check
        g, resume = self.greenlet, self.take_resume()
        if g is not None:
            g.kill(block=False)   # a greenlet killed before it ran never runs
        if resume is not None:
            gevent.spawn(resume, begin=_cancelled)


def _cancelled() -> bool:
    raise gevent.GreenletExit()


class KernelRelay:
    kind = "kernel"
    wants_record = True   # for the keeper: the pair may end in another worker

    def __init__(self, pin_path: str, *, max_queued: int = 64 << 20, sndbuf: int = 32 << 20, counters=None,
                 keeper: keeper.Link | None = None, batch_bytes: int = 0, batch_rate: float = math.inf):
        self.max_queued, self.sndbuf = max_queued, sndbuf
        self.batch_bytes, self.batch_rate = batch_bytes, batch_rate   # see _batch
        self._batched: set[Pair] = set()
        self.counters = counters   # the worker's CounterRow, if any
        self.keeper = keeper       # the worker's link to the master's keeper (keeper.py)
        self.kept = 0              # pairs begun here that the master holds copies of
        self.unowned = 0           # pairs no Connection holds: adopted, or stowed here (see adopt)
        self.ends_kept = None      # ends those: (their record, RelayResult); the worker's
        self._maps: list[PinnedMap] = []
        try:
            self.sock_map, self.sock_targets, self.connections, self.control = (
                self._open(os.path.join(pin_path, name))
                for name in (SOCK_MAP, SOCK_TARGETS, CONNECTION_MAP, RELAY_CONTROL))
        except BaseException:
            self.close()
            raise
        # The real epoll: gevent's patched select module has none.
        self._epoll = gevent.monkey.get_original("select", "epoll")()
        self._pairs_by_fd: dict[int, Pair | StowedPair] = {}
        self.wakeups = 0  # epoll deliveries: stays small however many bytes flow
        self.pauses = 0   # times a direction was paused for a slow reader
        self.checks = 0   # times a pair's counters were read (see _watch)
        self.sweeps = 0   # passes of the idle sweep (see _sweep)
        self.on_park = None   # called when a pair parked in the idle sweep, letting its greenlet go
        self.full = 0     # pairs declined because the maps were full
        self.unkept = 0   # pairs the master could not keep (its file limit, or ours)
        self._warned: dict[str, float] = {}   # warning -> when it was last logged (_warn)
        self._idle: set[Pair | StowedPair] = set()   # watched by the idle sweep, against their entries
        self._idle_keys: dict[bytes, Pair | StowedPair] = {}   # each idle pair's two keys
        self._walk = None   # the sweep's batch read while it goes on over several loop turns
        self._arrivals: collections.deque[_Task] = collections.deque()   # handed over quiet (start)
        self._registrar = None   # the greenlet that registers them
        self._loop = gevent.get_hub().loop
        self._watcher = self._loop.io(self._epoll.fileno(), 1)
        self._watcher.start(self._on_epoll)
        self._sweeper = self._loop.timer(MAX_CHECK_INTERVAL, MAX_CHECK_INTERVAL)
        self._walker = self._loop.timer(0.0)
        self._flusher = self._loop.timer(BATCH_FLUSH, BATCH_FLUSH)

    @property
    def live_pairs(self) -> int:
        return len(self._pairs_by_fd) // 2

    def _open(self, path: str) -> PinnedMap:
        m = PinnedMap.open(path)
        self._maps.append(m)
        return m

    # -- the relay interface ------------------------------------------------

    def start(self, client: socket.socket, upstream: socket.socket, limits: Limits, on_done: OnDone,
              handoff=None, before: Progress | None = None, record: dict | None = None) -> _Task:
        """The pair's watch runs in a greenlet of its own: it waits on its counters. It
        holds the pair to its end: a handoff does not apply.
        `before`, from a Chain, says the pair was handed over quiet.
        `record`, the pair's access-log record so far, goes to the keeper with it."""
        # A pair handed over quiet (`before`) joins the idle sweep at its first check if
        # that finds it quiet, and it waits for that in a queue: one greenlet registers
        # and checks such pairs in turn (_register_arrivals). Thousands of idle
        # connections are handed over together, and a greenlet each, all spawned at once,
        # left ~1.2 KiB each of fragmented heap behind.
        task = _Task(on_done)
        if before is not None:
            task.arrival = (client, upstream, limits, record)
            self._arrivals.append(task)
            if self._registrar is None:
                self._registrar = gevent.spawn(self._register_arrivals)
            return task

        def run() -> RelayResult | None:
            pair = Pair(client, upstream)
            return self._run(task, pair, limits, kept=None, adopted=False, begin=lambda: self._begin(pair, record))
        task.greenlet = gevent.spawn(self._relay, task, run)
        return task

    def _register_arrivals(self) -> None:
        """Register the pairs handed over quiet, in turn, each with one check: a quiet
        one parks, any other goes on in a greenlet of its own (MOVED)."""
        try:
            while self._arrivals:
                task = self._arrivals.popleft()
                arrival, task.arrival = task.arrival, None
                if arrival is None:   # cancelled while it waited
                    continue
                client, upstream, limits, record = arrival
                pair = Pair(client, upstream)
                try:
                    self._relay(task, lambda: self._run(task, pair, limits, None, False, once=True,
                                                        begin=lambda: self._begin(pair, record)))
                except gevent.GreenletExit:   # cancelled during its registration: cleaned up
                    pass
        finally:
            self._registrar = None

    def adopt(self, packed: bytes, fds: list[int], limits: Limits) -> None:
        """Take over a pair the kernel relays for a worker that exited (keeper.py): the
        sockets are already in the maps, and `packed` holds what that worker knew. No
        Connection holds it: ends_kept ends it."""
        self.unowned += 1
        self._take(packed, fds, limits)

    def _take(self, packed: bytes, fds, limits: Limits, last_activity: float | None = None) -> None:
        """Watch a pair no Connection holds, rebuilt from its kept state: adopted, or
        stowed here and woken (then with its last activity, for the idle limit)."""
        state = keeper.unpack(packed)
        record = state["record"]   # all that its end needs of the state
        client, upstream = (socket.socket(fileno=fd) for fd in fds)
        try:
            pair = self._rebuild(state, client, upstream, last_activity)
        except Exception:
            # Nothing may keep these numbers when the sockets close: the next ones opened
            # get them, and a stale entry would wake (and end) that pair instead.
            for fd in fds:
                self._unwatch(fd)
            client.close(), upstream.close()
            self.unowned -= 1
            if self.keeper is not None:   # nor may the master keep its copies
                self._drop(state["key"], begun_here=False)
            raise

        def ended(result: RelayResult) -> None:
            self.unowned -= 1
            client.close(), upstream.close()
            self.ends_kept(record, result)
        task = _Task(ended)
        task.greenlet = gevent.spawn(self._relay, task, lambda: self._run(task, pair, limits, kept=packed, adopted=True))

    def _rebuild(self, state: dict, client: socket.socket, upstream: socket.socket,
                 last_activity: float | None) -> Pair:
        """The pair as its kept state and the maps describe it, watched for its ends."""
        pair = Pair(client, upstream)
        for side, saved in zip(pair.sides, state["sides"]):
            side.restore(saved)
        for side in pair.sides:
            control = self.control.lookup(side.key)
            side.kernel = KernelCounts.of(self.connections.lookup(side.key))
            if control is not None:      # it was paused, or resuming: resume it in order
                side.paused, side.forwarded = True, RelayControl.unpack(control).forwarded
            else:                        # after a resume, everything kept was sent on
                side.forwarded = side.kernel.passed
        for side in pair.sides:
            side.fin_sent = pair.peer(side).sent_fin()
            self._watch_ends(pair, side)
            _kick(side.sock)   # a worker that batched it left its low-water mark
        pair.interval = MIN_CHECK_INTERVAL
        pair.last_check = time.monotonic()
        pair.last_activity = pair.last_check if last_activity is None else last_activity
        return pair

    def _relay(self, task: _Task, run: Callable[[], RelayResult | None]) -> None:
        """A greenlet of the pair's watch: it ends with the pair (on_done), or when the
        pair parks (another greenlet resumes it)."""
        try:
            result = run()
        except Exception:  # noqa: BLE001 - the connection must still end
            log.exception("kernel relay failed")
            result = RelayResult(0, 0, "error", self.kind)
        if result is not None and task.on_done is not None:
            task.on_done(result)

    def _begin(self, pair: Pair, record: dict | None) -> bytes | None:
        """Register the pair, and have the master keep it; its kept state if it does."""
        began = time.monotonic()
        self._register(pair)
        if self.counters is not None:
            self.counters.observe_registration(time.monotonic() - began)
        pair.interval = MIN_CHECK_INTERVAL
        pair.last_activity = pair.last_check = time.monotonic()
        return self._keep(pair, record)

    def _run(self, task: _Task, pair: Pair, limits: Limits, kept: bytes | None, adopted: bool,
             begin: Callable[[], bytes | None] | None = None, once: bool = False) -> RelayResult | None:
        """Watch the pair until it ends, or parks (None): quiet long enough to join the idle
        sweep, it lets its greenlet go, and the sweep or epoll resumes it (_wake). kept:
        its state as the master keeps it (keeper.pack), or None. once: the
        registrar's run, which never sleeps: after one check a pair that does not park
        goes on in a greenlet of its own."""
        outcome, parked = "error", False
        try:
            if begin is not None:
                kept = begin()
            outcome = self._watch(pair, limits, once=once)
            if task.on_done is None:      # cancelled while the registrar had it
                raise gevent.GreenletExit()
            if outcome == MOVED:   # its watch goes on, as a parked one resumes (see cancel)
                parked = True
                task.park(self, pair, limits, kept, adopted)
                self._resume_in_greenlet(task)
                return None
            if outcome == PARKED:
                parked = True
                if self.on_park is not None:
                    self.on_park()
                if kept is not None and self.ends_kept is not None:
                    self._stow(task, pair, limits, kept, adopted)
                else:
                    task.park(self, pair, limits, kept, adopted)
                    pair.park(task)
                return None
        except _Declined:
            return RelayResult(pair.client.early, pair.upstream.early, "declined")
        except OSError as e:
            if e.errno in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
                outcome = "reset"            # a peer went away: an outcome, not a fault
            else:
                log.warning("kernel relay failed: %s", e, exc_info=True)
                outcome = "error"
        finally:
            if not parked:
                pair.parked = None
                (up, down), (kernel_up, kernel_down) = self._unregister(pair, finished=outcome == "done")
                if kept is not None:
                    self._drop(COOKIE.unpack(pair.client.key)[0], begun_here=not adopted)
        if pair.client.pauses or pair.upstream.pauses:
            log.debug("kernel relay paused up %d, down %d times (%d/%d bytes kept for userspace)",
                      pair.client.pauses, pair.upstream.pauses, pair.client.forwarded, pair.upstream.forwarded)
        return RelayResult(up, down, outcome, self.kind, kernel_up, kernel_down)

    # -- registration -------------------------------------------------------

    def _size_buffers(self, sock: socket.socket) -> None:
        # The redirect kworker backs off when the target's send buffer is half
        # full, so relayed sockets need large ones. The receive buffer stays
        # autotuned: the verdict empties it at once, and all a large one adds is
        # what a pause keeps for userspace to forward (measured: no faster).
        keeper.force_sndbuf(sock, self.sndbuf)

    @staticmethod
    def _drain_into(src: Side, dst: Side) -> None:
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

    def _register(self, pair: Pair) -> None:
        """Hand the pair to the kernel, or raise _Declined with nothing left in the
        maps: a socket is no longer ESTABLISHED (sockmaps refuse it), or a map is full."""
        c, u = pair.sides
        for side in pair.sides:
            self._size_buffers(side.sock)
        self._drain_into(c, u)
        self._drain_into(u, c)
        for side in pair.sides:
            side.take_baselines()
        if any(side.state0 != TCP_ESTABLISHED for side in pair.sides):
            raise _Declined()
        # A FIN may still arrive before an insertion, or a map be full. Until the
        # first SOCK_MAP insertion no verdict runs, so backing out is clean.
        try:
            for src, dst, direction in ((c, u, DIRECTION_UP), (u, c, DIRECTION_DOWN)):
                entry = Connection(peer=COOKIE.unpack(dst.key)[0], bytes=0, skbs=0, passed=0, direction=direction)
                self.connections.update(src.key, entry.pack())
            for sockets, side in ((self.sock_targets, c), (self.sock_targets, u), (self.sock_map, c)):
                sockets.update(side.key, COOKIE.pack(side.fd))
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.E2BIG):
                raise
            if e.errno == errno.E2BIG:
                self._note_full()
            self._forget_sockets(pair)
            for side in pair.sides:
                self.connections.delete(side.key)
            raise _Declined() from None
        try:
            self.sock_map.update(u.key, COOKIE.pack(u.fd))
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            # The upstream got its FIN: everything it will send is in its
            # receive queue. c's verdict already runs, so finish u -> c here.
            u.in_userspace = True
        for side in pair.sides:
            self._watch_ends(pair, side)
            if side.in_userspace:
                self._drain_into(side, pair.peer(side))
            elif side.may_hold_stranded_bytes():
                _kick(side.sock)

    def _unwatch(self, fd: int) -> None:
        if self._pairs_by_fd.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _watch_ends(self, pair: Pair, side: Side) -> None:
        """Wake the pair on side's FIN, hang-up or error (never on data: see the docstring).
        A stowed pair rebuilt is still registered."""
        if self._pairs_by_fd.get(side.fd) is None:
            self._epoll.register(side.fd, select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR | select.EPOLLET)
        self._pairs_by_fd[side.fd] = pair

    def _keep(self, pair: Pair, record: dict | None) -> bytes | None:
        """Give the master copies of both sockets (keeper.py): from now on the pair
        outlives this worker. Its packed state, or None when there is no keeper, or it
        could not take them."""
        if self.keeper is None or record is None:
            return None
        state = {"key": COOKIE.unpack(pair.client.key)[0], "record": record,
                 "sides": [side.saved() for side in pair.sides]}
        packed = keeper.pack(state)
        try:
            self.keeper.send({"op": "keep", "key": state["key"]}, (pair.client.fd, pair.upstream.fd), packed)
        except OSError as e:
            self.unkept += 1
            self._warn("the master could not keep %d kernel pairs so far (%s): they end with this worker",
                       self.unkept, e)
            return None
        self.kept += 1
        return packed

    def _stow(self, task: _Task, pair: Pair, limits: Limits, packed: bytes, adopted: bool) -> None:
        """Park a pair the master keeps as a StowedPair, and let its owner go: its
        Connection ends without a log line (STOWED), and the pair is ours alone, to end as
        an adopted one (ends_kept). Its sockets' fds stay open, and in the sweep and epoll."""
        stowed = StowedPair(pair, packed, limits)
        self._leave_idle(pair)
        self._enter_idle(stowed, pair.idle_due)
        for side in pair.sides:
            self._pairs_by_fd[side.fd] = stowed
            side.sock.detach()
        if not adopted:      # begun here: its Connection leaves, and the pair counts as adopted
            self.kept -= 1
            self.unowned += 1
            task.on_done(RelayResult(0, 0, STOWED, self.kind))

    def _unstow(self, stowed: StowedPair) -> None:
        self._leave_idle(stowed)
        self._take(keeper.packed_of(stowed.kept), stowed.fds, stowed.limits, stowed.last_activity)

    def _drop(self, key: int, begun_here: bool) -> None:
        self.kept -= begun_here
        try:
            self.keeper.send({"op": "drop", "key": key})
        except OSError as e:   # the master is gone: its copies went with it
            log.debug("dropping a kept pair: %s", e)

    def _note_full(self) -> None:
        self.full += 1
        if self.counters is not None:
            self.counters.add("kernel_maps_full")
        self._warn("kernel relay maps are full (bpf.max_pairs): %d pairs relayed in userspace so far", self.full)

    def _warn(self, message: str, *args) -> None:
        """Log a warning that may come for every pair at most once in WARN_INTERVAL: the
        first time, and then with the count so far."""
        now = time.monotonic()
        if now - self._warned.get(message, -math.inf) >= WARN_INTERVAL:
            self._warned[message] = now
            log.warning(message, *args)

    def _forget_sockets(self, pair: Pair) -> None:
        for side in pair.sides:
            for m in (self.sock_map, self.sock_targets, self.control):
                m.delete(side.key)

    def _unregister(self, pair: Pair, finished: bool) -> tuple[tuple[int, int], tuple[int, int]]:
        """Remove the pair everywhere; return (up, down) since registration, and of
        those, (up, down) as the verdict counted them.
        A finished pair (both FINs carried) receives nothing more, and closing a
        socket removes it from every sockmap, so only its CONNECTION_MAP entries
        go: no side is paused then (a FIN is carried only after a resume, which
        removes the RELAY_CONTROL entry)."""
        self._leave_idle(pair)
        if pair in self._batched:
            self._unbatch(pair)
        for side in pair.sides:   # first: a map error below must not leave the numbers watched
            self._unwatch(side.fd)
        if not finished:
            self._forget_sockets(pair)
        totals, redirected = [], []
        for side in pair.sides:
            kernel = KernelCounts.of(self.connections.pop(side.key))
            redirected.append(kernel.redirected)
            totals.append(side.early + side.forwarded + kernel.redirected)
        return (totals[0], totals[1]), (redirected[0], redirected[1])

    # -- the watch: one check after each sleep, in named steps ------------------

    def _wake(self, pair: Pair | StowedPair) -> None:
        """Wake the pair's watch: end its sleep, or resume it if it is parked (or stowed)."""
        if type(pair) is StowedPair:
            return self._unstow(pair)
        pair.wake()
        task, pair.parked = pair.parked, None
        if task is not None and task.greenlet is None and task.parked:
            self._resume_in_greenlet(task)

    def _resume_in_greenlet(self, task: _Task) -> None:
        """The parked watch goes on in a new greenlet; its resume stays with the task until
        that greenlet runs (see cancel)."""
        task.greenlet = gevent.spawn(self._relay, task, lambda: task.take_resume()())

    def _watch(self, pair: Pair, limits: Limits, once: bool = False) -> str:
        """Check the pair after each sleep until it ends or parks. once: one check, at once
        (a pair handed over quiet, in the registrar); unless it ends, the pair then PARKED
        if that check found it quiet, else MOVED."""
        first = once
        while True:
            # A pair handed over quiet is checked at once: if it is still quiet, its
            # greenlet ends without a sleep, a timer or a switch (thousands of idle
            # connections are handed over together).
            woken = False if first else pair.sleep(self._loop, pair.interval)
            first = False
            self._leave_idle(pair)
            self.checks += 1
            now = time.monotonic()
            limit = limits.idle_limit(pair.half_closed)
            # The verdict's counts first: read after TCP_INFO, bytes redirected in
            # between would look queued and could pause a direction for nothing.
            self._read_kernel_counts(pair)
            if pair.quiet and not woken and pair.client.kernel == pair.sample.client \
                    and pair.upstream.kernel == pair.sample.upstream:
                self._batch(pair, False)   # before it may park
                rested = self._rest(pair, now, limit)
                if rested is not None:
                    return rested
                continue
            pair.read_tcp()
            if self._reset_seen(pair):
                return "reset"
            worst_queued = self._bound_queues(pair, limit)
            if worst_queued is None:
                return "idle_timeout"   # the reader stopped reading altogether
            waiting = self._carry_half_closes(pair)
            if pair.finished:
                return "done"
            if self._pace(pair, now, limit, worst_queued, waiting):
                return "idle_timeout"
            if once:
                return PARKED if pair.quiet and self._join_sweep(pair, now, limit) == PARKED else MOVED

    def _read_kernel_counts(self, pair: Pair) -> None:
        for side in pair.sides:
            side.entry = self.connections.lookup(side.key)
            side.kernel = KernelCounts.of(side.entry)

    def _rest(self, pair: Pair, now: float, limit: float) -> str | None:
        """A quiet pair whose counts did not move: no queue can have grown, and a FIN
        or a reset would have woken it through epoll. Idle pairs end here, checked
        less and less often, then by the idle sweep. "idle_timeout" when the idle limit
        passed; PARKED when the sweep takes the pair over."""
        if now - pair.last_activity >= limit:
            return "idle_timeout"
        pair.last_check = now
        interval = min(pair.interval * 2, MAX_CHECK_INTERVAL)
        if interval == MAX_CHECK_INTERVAL:
            return self._join_sweep(pair, now, limit)
        pair.interval = max(min(interval, pair.last_activity + limit - now), MIN_CHECK_INTERVAL)
        return None

    def _join_sweep(self, pair: Pair, now: float, limit: float) -> str | None:
        """Quiet a while: the idle sweep watches the pair's entries from now on (bytes
        redirected since they were read show there). With the idle limit far enough off
        for the sweep's pace, it watches the limit too, and the pair lets its greenlet go
        (a waiting greenlet holds about 7.5 KiB of RSS): PARKED. Else its own timer waits
        for the limit."""
        due = pair.last_activity + limit
        park = due - now > 2 * MAX_CHECK_INTERVAL
        self._enter_idle(pair, due if park else math.inf)
        pair.interval = math.inf if park else max(due - now, MIN_CHECK_INTERVAL)
        return PARKED if park else None

    def _reset_seen(self, pair: Pair) -> bool:
        """A side closed with an error: reset the other one too. A side whose bytes the
        verdict could not pass on intact (CONNECTION_BROKEN): reset both."""
        for side in pair.sides:
            if side.kernel.broken:
                log.warning("kernel relay reset a pair: the verdict could not cut bytes received twice")
                self._mirror_reset(side)
                self._mirror_reset(pair.peer(side))
                return True
        for side in pair.sides:
            if side.tcp.state == TCP_CLOSE and side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._mirror_reset(pair.peer(side))
                return True
        return False

    def _bound_queues(self, pair: Pair, limit: float) -> int | None:
        """Pause a direction whose reader lags by more than max_queued, resume it once
        the reader caught up to half that; the most queued toward a reader, or None
        when a resume waited out the idle limit."""
        worst_queued = 0
        for src, dst in pair.directions():
            delivered = src.kernel.redirected + src.forwarded
            # Queued in the kernel toward dst and not yet in dst's write queue:
            # the part no socket buffer bounds (the write queue is sndbuf-bounded).
            queued = delivered - dst.written(dst.tcp)
            worst_queued = max(worst_queued, queued)
            if not src.paused and queued > self.max_queued:
                self._pause(src)
            elif src.paused and queued <= self.max_queued // 2:
                try:
                    with gevent.Timeout(limit):
                        self._resume(src, dst)
                except gevent.Timeout:
                    return None
        return worst_queued

    def _carry_half_closes(self, pair: Pair) -> bool:
        """Carry a FIN once everything its sender sent is in the peer's write queue;
        True while a direction waits for that (or is paused)."""
        waiting = False
        for src, dst in pair.directions():
            waiting |= src.paused
            if src.paused or not src.tcp.fin_received:
                continue
            waiting = True
            if src.unread():
                _kick(src.sock)  # bytes still waiting in src's receive queue
            elif src.kernel.passed == src.forwarded and \
                    dst.written(dst.tcp) >= src.kernel.redirected + src.forwarded:
                dst.sock.shutdown(socket.SHUT_WR)   # the FIN goes behind everything
                dst.fin_sent = True
        return waiting

    def _pace(self, pair: Pair, now: float, limit: float, worst_queued: int, waiting: bool) -> bool:
        """When to check next: soon enough that, at the rate since the last check, no
        queue outgrows max_queued; less and less often while nothing moves. True when
        the idle limit passed."""
        c, u = pair.sides
        sample = Sample(c.kernel, u.kernel, c.tcp.acked, u.tcp.acked)
        last, interval = pair.sample, pair.interval
        if last is None:
            pass  # the first check keeps the pace it was given
        elif sample != last:
            pair.last_activity = now
            (c1, u1), (c0, u0) = sample[:2], last[:2]
            redirected = c1.redirected + u1.redirected - c0.redirected - u0.redirected
            skbs = c1.skbs + u1.skbs - c0.skbs - u0.skbs
            rate = (redirected + c1.passed + u1.passed - c0.passed - u0.passed) / max(now - pair.last_check, 1e-6)
            interval = self._check_interval(rate, worst_queued) if rate > 0 else MIN_CHECK_INTERVAL
            # Once batched, skbs that wait in the queue merge (TCP coalesces them): only
            # the rate ends a batch.
            small = pair in self._batched or skbs > 0 and redirected < skbs * BATCH_BELOW
            self._batch(pair, rate >= self.batch_rate and small and not waiting and not pair.half_closed)
        elif now - pair.last_activity >= limit:
            return True
        else:
            self._batch(pair, False)
            interval *= 2  # idle pairs cost less and less
        pair.sample, pair.last_check = sample, now
        pair.quiet = not waiting and worst_queued <= 0
        ceiling = DRAIN_CHECK_INTERVAL if waiting else MAX_CHECK_INTERVAL
        pair.interval = min(max(interval, MIN_CHECK_INTERVAL), ceiling,
                            max(pair.last_activity + limit - now, MIN_CHECK_INTERVAL))
        return False

    def _check_interval(self, rate: float, queued: int) -> float:
        """How soon to check again so that, at this rate (bytes/s), the kernel's queue
        cannot grow past max_queued before the check; at most MAX_CHECK_INTERVAL."""
        headroom = max(self.max_queued - queued, 0)
        return min(max(headroom / (2 * rate), MIN_CHECK_INTERVAL), MAX_CHECK_INTERVAL) if rate > 0 \
            else MAX_CHECK_INTERVAL

    def _batch(self, pair: Pair, fast: bool) -> None:
        """Batch the verdict of a fast pair, or stop. Batched, the verdict runs once
        batch_bytes wait on a socket, or at the flush (_flush_batched). Never for a pair
        that waits for a FIN or a resume: those steps count on each skb's verdict."""
        if (fast and self.batch_bytes > 0) == (pair in self._batched):
            return
        if pair in self._batched:
            self._unbatch(pair)
            return
        for side in pair.sides:
            self._hold(side.sock)
        if not self._batched:
            self._flusher.start(self._flush_batched)
        self._batched.add(pair)
        if self.counters is not None:
            self.counters.add("kernel_batched")

    def _unbatch(self, pair: Pair) -> None:
        """Back to a verdict for each skb, run now over whatever waits."""
        self._batched.discard(pair)
        if not self._batched:
            self._flusher.stop()
        for side in pair.sides:
            try:
                _kick(side.sock)
            except OSError:   # closed: its end is on the way
                pass

    def _flush_batched(self) -> None:
        """Run the verdict of every batched pair over what waits (a low-water mark of 1
        runs it at once), then hold it back again."""
        for pair in self._batched:
            for side in pair.sides:
                try:
                    _kick(side.sock)
                    self._hold(side.sock)
                except OSError:
                    pass

    def _hold(self, sock: socket.socket) -> None:
        """No verdict until batch_bytes wait (or the next flush)."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, self.batch_bytes)

    # -- the idle sweep -------------------------------------------------------

    def _sweep(self) -> None:
        """Wake the idle pairs whose CONNECTION_MAP entries changed (the verdict relayed
        or kept bytes for them), and the parked ones whose idle limit is due. A FIN or a
        reset wakes a pair through epoll instead."""
        if self._walk is not None:   # the last pass is still reading
            return
        self.sweeps += 1
        now = time.monotonic()
        self._wake_all([pair for pair in self._idle if now >= pair.idle_due])
        if len(self._idle) < SWEEP_BATCH_FROM:
            try:
                lookup = self.connections.lookup
                self._wake_all([pair for pair in self._idle
                                if any(pair.changed(key, lookup(key)) for key in pair.keys)], moved=True)
            except OSError as e:
                self._sweep_failed(e)
        else:
            # The batch reads every worker's entries (19,300 with 9,650 idle pairs take
            # ~15 ms at once): a chunk per loop turn, so relaying in between never waits long.
            self._walk = self.connections.batches(SWEEP_CHUNK)
            self._walk_on()

    def _walk_on(self) -> None:
        """The batch read's next chunk: wake the idle pairs whose entries in it changed."""
        try:
            keys, values, n = next(self._walk)
        except StopIteration:
            self._walk = None
            return
        except OSError as e:
            self._walk = None
            return self._sweep_failed(e)
        ks, vs, watched = self.connections.key_size, self.connections.value_size, self._idle_keys.get
        changed = []
        for i in range(n):
            key = keys[i * ks:(i + 1) * ks]
            pair = watched(key)
            if pair is not None and pair.changed(key, values[i * vs:(i + 1) * vs]):
                changed.append(pair)
        self._wake_all(changed, moved=True)
        self._walker.start(self._walk_on)   # after the loop has polled for I/O

    def _sweep_failed(self, e: OSError) -> None:
        log.warning("idle sweep failed: %s", e)   # then every idle pair checks itself once
        self._wake_all(list(self._idle))

    def _wake_all(self, pairs: list[Pair | StowedPair], moved: bool = False) -> None:
        """moved: their entries changed, which is activity. (A parked pair's first check
        after the wake has no sample to compare, and would not see it.)"""
        now = time.monotonic()
        for pair in pairs:
            if pair in self._idle:   # once, though both its entries changed
                if moved:
                    pair.last_activity = now
                self._leave_idle(pair)
                self._wake(pair)

    def _enter_idle(self, pair: Pair | StowedPair, due: float) -> None:
        """due: when the sweep wakes the pair for its idle limit (inf: its own timer does).
        The sweep compares the pair's entries with those read at its last check (changed)."""
        pair.idle_due = due
        self._idle.add(pair)
        client, upstream = pair.keys
        self._idle_keys[client] = self._idle_keys[upstream] = pair
        if not self._sweeper.active:
            self._sweeper.start(self._sweep)

    def _leave_idle(self, pair: Pair | StowedPair) -> None:
        if pair not in self._idle:
            return
        self._idle.discard(pair)
        client, upstream = pair.keys
        del self._idle_keys[client], self._idle_keys[upstream]
        if not self._idle:
            self._sweeper.stop()

    def _on_epoll(self) -> None:
        for fd, _ in self._epoll.poll(0):
            self.wakeups += 1
            pair = self._pairs_by_fd.get(fd)
            if pair is not None:
                self._wake(pair)

    # -- backpressure: see RELAY_CONTROL in bpf/relay.c -------------------------

    def _pause(self, src: Side) -> None:
        """Keep src's bytes on src: its receive buffer fills and TCP stops the sender.
        (Removing src from SOCK_MAP instead can drop an skb: a verdict already
        under way finds no program and drops.)"""
        self.control.update(src.key, RelayControl(MODE_PAUSED, src.forwarded).pack())
        # A verdict under way may still redirect one skb; after this, none will
        # until the resume, so the redirected count stands still.
        _wait_for_rcu_readers()
        src.paused = True
        src.pauses += 1
        self.pauses += 1

    def _kept(self, src: Side) -> KernelCounts:
        return KernelCounts.of(self.connections.lookup(src.key))

    def _resume(self, src: Side, dst: Side) -> None:
        """Send on what src kept, in order, then let the verdict relay again."""
        # Bytes redirected before the pause may still wait in dst's psock queue,
        # outside its write queue; what we send now must go behind them.
        redirected = self._kept(src).redirected
        while dst.written(TcpCounters.of(dst.sock)) < redirected + src.forwarded:
            gevent.sleep(0.001)
        self.control.update(src.key, RelayControl(MODE_RESUMING, src.forwarded).pack())
        while True:
            data = _recv_nowait(src.sock) or b""
            if data:
                send_all(dst.sock, data)
                src.forwarded += len(data)
                self.control.update(src.key, RelayControl(MODE_RESUMING, src.forwarded).pack())
            elif self._kept(src).passed != src.forwarded:
                gevent.sleep(0.001)  # kept skbs still on their way into src's queue
            else:
                # A verdict that read the previous `forwarded` may still be
                # running and about to keep one more skb. Verdicts run under
                # RCU: once every reader in flight is done, equality holds for good.
                _wait_for_rcu_readers()
                if self._kept(src).passed == src.forwarded:
                    break
        self.control.delete(src.key)
        src.paused = False

    @staticmethod
    def _mirror_reset(side: Side) -> None:
        # Closing with a zero linger sends RST: the other end learns of the reset.
        try:
            side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            if e.errno not in (errno.EBADF, errno.ENOTCONN):
                raise

    def close(self) -> None:
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            self._idle.clear()   # a pair still watched leaves nothing to stop afterwards
            self._idle_keys.clear()
            self._walk = None
            self._batched.clear()
            for timer in (sweeper, self._walker, self._flusher):
                timer.stop()
                timer.close()
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
