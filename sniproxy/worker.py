"""A worker: a gevent process serving its slot's listening sockets.

`Worker.__init__` runs in the master and has no side effects; everything after
fork happens in `run()`, in the child: close what belongs to the master and to
the sibling workers, take the signals, build the one Context that every
connection reads (connection.py), then accept until told to stop.
"""
from __future__ import annotations

import _socket
import errno
import logging
import math
import os
import signal
import socket
import struct
import tempfile
import time
from dataclasses import dataclass

from .config import Config, ListenerConfig
from .counters import CounterTable
from .kernel_abi import STEER_LISTENERS_MAX, STEER_SLOTS, STEER_WORKERS_MAX

log = logging.getLogger("sniproxy.worker")

# Every signal the master handles, and a worker too. The master blocks them
# across fork, so a worker takes each one with its own handler, never the master's.
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)

# A worker that cannot boot exits with this, so the master halts instead of
# respawning it forever.
BOOT_ERROR = 3
PARENT_CHECK_INTERVAL = 1.0
TRIM_AFTER = 512   # connections ended or kernel pairs parked since memory was last given back
ACCEPT_RETRY = 0.1   # out of descriptors: how soon to try accepting again


def malloc_trim() -> None:
    """glibc's malloc_trim(0): free pages of the heap go back to the system."""
    import ctypes
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):   # not glibc
        pass


@dataclass
class Slot:
    """What the master hands a worker: its listeners and their sockets."""
    listeners: list[tuple[ListenerConfig, socket.socket]]


class Heartbeat:
    """An unlinked file the worker stamps with the monotonic clock (shared by every
    process, and never set back like wall time); the master reads the stamp."""
    _STAMP = struct.Struct("d")

    def __init__(self):
        self.fd, path = tempfile.mkstemp(prefix="sniproxy-heartbeat-")
        os.unlink(path)
        self.beat()   # a worker that never beats is as late as its age
        self.created = self._stamp()

    def beat(self) -> None:
        os.pwrite(self.fd, self._STAMP.pack(time.monotonic()), 0)

    def _stamp(self) -> float:
        return self._STAMP.unpack(os.pread(self.fd, self._STAMP.size, 0))[0]

    def age(self) -> float:
        return time.monotonic() - self._stamp()

    @property
    def booted(self) -> bool:
        """The worker has beaten once: it is set up and accepting."""
        return self._stamp() > self.created

    def close(self) -> None:
        os.close(self.fd)


def _bpf_fds() -> list[int]:
    """The master's BPF maps, programs and BTF, open in this child since fork: a worker
    opens the pins it uses by path, and copies here would keep old maps alive."""
    fds = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(("anon_inode:bpf", "anon_inode:btf")):
                fds.append(int(name))
        except OSError:
            pass   # the directory's own fd, closed by now
    return fds


class Worker:
    def __init__(self, cfg: Config, index: int, number: int, slot: Slot, *, relay_kind: str,
                 bpf_pins: str | None, heartbeat: Heartbeat, counters_path: str, inherited: list[int],
                 owner: tuple[int, int] | None = None, caps: set[int] = frozenset(), keeper=None):
        self.cfg = cfg
        self.index = index           # slot, stable across respawns and reloads
        self.number = number         # spawn number, unique for the master's life
        self.slot = slot
        self.relay_kind = relay_kind
        self.bpf_pins = bpf_pins     # pin dir with DNS_CACHE (and the relay maps when kernel)
        self.heartbeat = heartbeat
        self.counters_path = counters_path
        self.inherited = inherited   # the master's fds this child must not keep
        self.owner = owner           # (uid, gid) to drop to, or None (master.user, master.group)
        self.caps = caps             # the capabilities it keeps then
        self.keeper = keeper         # its end of the channel to the master's keeper (kernel relay only)
        self.master_pid = os.getpid()   # __init__ runs in the master
        self.alive = True
        self.held = False            # full (master.max_connections): not accepting for now
        self.kernel = None           # the kernel relay, if the policy has one
        self.steering = None         # our slot of bpf/steer.c's counters (steering.SlotCells)
        self.handing_over = False    # leaving for a successor (SIGUSR2), not stopping (SIGTERM)
        self.fd_errors_logged = -math.inf

    # --- in the child ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._init_process()
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot boot"
            log.error("worker %d cannot boot: %s", self.index, e)
            os._exit(BOOT_ERROR)
        import gevent
        for lc, listening in self.slot.listeners:
            self.acceptors.append(self.loop.io(listening.fileno(), 1))
        self._watch_listeners()
        gevent.spawn(self._heartbeat)
        self.stopping.wait()
        self._stop_gracefully()

    def _init_process(self) -> None:
        self._close_inherited()
        from gevent import monkey
        monkey.patch_all(thread=False, signal=False, subprocess=False)
        import gevent
        import gevent.event
        # No spawning stack per greenlet: summaries of up to ten frames, some 0.35 KiB (the
        # cost of a spawn, too). Measured with thousands of idle pairs handed to the kernel
        # relay together: 0.3 KiB less RSS per pair.
        gevent.config.track_greenlet_tree = False
        import setproctitle

        from .accesslog import AccessLog
        from .connection import Connection, Context
        from .relay import Limits

        gevent.get_hub().loop.reinit()
        setproctitle.setproctitle(f"sniproxy: worker {self.index}")
        self.access_log = AccessLog(self.cfg.log.access)
        self._take_signals()

        self.Connection = Connection     # imported here, not on the first connection
        self.loop = gevent.get_hub().loop
        self.counters = counters = CounterTable(self.counters_path).row(self.number)
        if self.keeper is not None:   # the channel to the master's keeper, as a non-blocking link
            from .keeper import Link
            self.keeper = Link(self.keeper, self.loop)
        self.relay = self._open_relay(counters)
        self.connections: set = set()   # live Connections
        self.freed = 0   # connections ended and kernel pairs parked since memory was last given back
        self.acceptors: list = []
        self.stopping = gevent.event.Event()
        self.all_ended = gevent.event.Event()
        timeouts = self.cfg.timeouts
        self.ctx = Context(
            loop=self.loop, counters=counters,
            source_filter=self._source_filter(), trusted=self._trusted(), router=self._router(),
            resolver=self._resolver(),
            relay=self.relay, timeouts=timeouts, limits=Limits(timeouts.idle, timeouts.half_closed),
            allow_private=self.cfg.resolver.allow_private, access_log=self.access_log, ended=self.connection_ended,
            listener_slots={lc.address: i for i, lc in enumerate(self.cfg.listener)})
        # Read once: a socket's family property makes an enum, in four Python calls, each time.
        self.families = {lc.address: int(listening.family) for lc, listening in self.slot.listeners}
        if self.keeper is not None:
            self.loop.io(self.keeper.sock.fileno(), 1).start(self._on_keeper)
        self.steering = self._steering()
        if self.owner is not None:   # before the first client byte is read
            from .privileges import drop
            drop(self.owner, set(self.caps))
        # What setting up freed (the master trimmed its own before the fork: BCC's compile),
        # about 2.5 MB: given back now, not by the first trim after connections.
        malloc_trim()

    def _close_inherited(self) -> None:
        """The master's wakeup pipe and ready pipe, the siblings' heartbeats, and the
        other slots' listening sockets. A copy of another slot's socket here would keep
        a slot that a reload removes in SO_REUSEPORT's group, taking new connections
        that no one accepts, for as long as this worker drains."""
        signal.set_wakeup_fd(-1)
        for fd in self.inherited + _bpf_fds():
            try:
                os.close(fd)
            except OSError:
                pass

    def _take_signals(self) -> None:
        import gevent
        # SIGTERM: a stop; SIGUSR2: a reload or an upgrade, where a successor goes on.
        handlers = {signal.SIGTERM: self._on_term, signal.SIGQUIT: lambda: os._exit(0),
                    signal.SIGUSR1: self.access_log.reopen, signal.SIGUSR2: self._on_handover}
        defaults = {signal.SIGINT: signal.SIG_IGN, signal.SIGHUP: signal.SIG_DFL,
                    signal.SIGCHLD: signal.SIG_DFL}
        assert set(handlers) | set(defaults) == set(SIGNALS)
        for sig, action in defaults.items():
            signal.signal(sig, action)
        for sig, handler in handlers.items():
            gevent.signal_handler(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)   # blocked by the master since fork

    def _source_filter(self):
        from .sourcefilter import SourceFilter
        return SourceFilter(self.cfg.access.allow, self.cfg.access.deny)

    def _trusted(self):
        from .sourcefilter import SourceFilter
        return {lc.address: SourceFilter(lc.trusted_sources) for lc, _ in self.slot.listeners if lc.accept_proxy}

    def _router(self):
        from .routing import Router
        return Router(self.cfg)

    def _resolver(self):
        from .dns_cache import LocalDnsCache, PinnedDnsCache
        from .kernel_abi import DNS_CACHE
        from .resolver import Resolver
        if self.bpf_pins and os.path.exists(os.path.join(self.bpf_pins, DNS_CACHE)):
            cache = PinnedDnsCache(self.bpf_pins)
        else:
            cache = LocalDnsCache(self.cfg.resolver.cache_size)
        return Resolver(self.cfg.resolver, cache, timeout=self.cfg.timeouts.connect, counters=self.counters)

    def _steering(self):
        """Our slot of bpf/steer.c's counters, where the program chooses among workers;
        None where it does not (or cannot: then the kernel's hash serves, as it did)."""
        if self.cfg.bpf.steering != "fill" or not self.bpf_pins or self.index >= STEER_WORKERS_MAX or \
                not os.path.exists(os.path.join(self.bpf_pins, STEER_SLOTS)):
            return None
        from .steering import SlotCells
        try:
            cells = SlotCells(self.bpf_pins, self.index)
            self._correct_steering(cells)
        except OSError as e:
            log.warning("worker %d: bpf.steering cannot map its slot's counters (%s); the program will "
                        "send it few connections", self.index, e)
            return None
        return cells

    def _correct_steering(self, cells) -> None:
        cells.holding(len(self.connections))
        for listener, (_, listening) in enumerate(self.slot.listeners[:STEER_LISTENERS_MAX]):
            cells.correct(listener, listening)

    def _open_relay(self, counters):
        """relay.policy, as a Chain: every connection starts in the copy relay."""
        from .relay import LEAVING, Chain, Handoff, Stage
        from .userspace_relay import UserspaceRelay
        bpf, relay, policy = self.cfg.bpf, self.cfg.relay, self.cfg.relay.policy
        kernel = splice = None
        if policy in ("auto", "kernel") and self.relay_kind == "kernel" and \
                not (policy == "auto" and relay.kernel_rate < 0):
            from .kernel_relay import KernelRelay
            kernel = KernelRelay(self.bpf_pins, max_queued=bpf.max_queued, sndbuf=bpf.sndbuf, counters=counters,
                                 batch_bytes=bpf.batch_bytes, batch_rate=relay.splice_rate,
                                 keeper=self.keeper)
            kernel.on_park = self._freed_one
            kernel.ends_kept = self._unowned_ended
        self.kernel = kernel
        # auto's fast pairs go to relay.fast_relay (TLS ones to relay.tls_fast_relay), and to
        # splice where the kernel is not there
        fast_to, tls_fast_to = ("kernel" if kernel and choice == "kernel" else "splice"
                                for choice in (relay.fast_relay, relay.tls_fast_relay))
        if policy == "splice" or policy == "auto" and "splice" in (fast_to, tls_fast_to):
            from .splice_relay import SpliceRelay
            splice = SpliceRelay()
        copy = UserspaceRelay()
        if policy != "auto":   # kernel without BPF is copy (the master said so at start)
            then = kernel or splice
            return Chain.of(copy, then, Handoff(bpf.handoff_bytes, bpf.handoff_after)) if then else copy
        fast = relay.splice_rate * relay.window
        quiet = relay.kernel_rate * relay.window if kernel else -1
        chatty = relay.kernel_messages if kernel and relay.kernel_messages > 0 else math.inf
        # A leaving worker's pairs go to the kernel relay, which outlives it (keeper.py).
        leaving = {LEAVING: "kernel"} if kernel else {}
        stages = {"copy": Stage(copy, Handoff(fast, relay.window, quiet, chatty, rate=relay.splice_rate),
                                {"fast": fast_to, "fast:tls": tls_fast_to, "quiet": "kernel", "chatty": "kernel",
                                 **leaving})}
        if splice is not None:
            stages["splice"] = Stage(splice, Handoff(math.inf, relay.window, fast / 2), {"quiet": "copy", **leaving})
        if kernel:   # a pair it declines (maps full, half-closed) is judged again in copy
            stages["kernel"] = Stage(kernel, None, {"declined": "copy"})
        return Chain(stages, "copy", on_move=lambda to: counters.add(f"moved_to_{to}"))

    def _heartbeat(self) -> None:
        """Beat every worker_timeout / 2; look for the master every second (a worker
        whose master is gone stops)."""
        import gevent
        interval, due = self.cfg.master.worker_timeout / 2, 0.0
        while True:              # until the process exits, draining included
            now = time.monotonic()
            if now >= due:
                self.heartbeat.beat()
                due = now + interval
            self._set_gauges()
            if self.steering is not None:
                self._correct_steering(self.steering)
            self._trim_memory()
            if os.getppid() != self.master_pid:
                log.warning("worker %d: master %d is gone, stopping", self.index, self.master_pid)
                self._on_term()
                return
            gevent.sleep(min(interval, PARENT_CHECK_INTERVAL))

    def _trim_memory(self) -> None:
        """Give freed memory back to the system once much was freed: TRIM_AFTER
        connections ended, or kernel pairs parked (each let a greenlet's stack go).
        glibc keeps freed memory for reuse otherwise, and a worker that once held
        many busy connections would keep their peak for good."""
        if self.freed >= TRIM_AFTER:
            malloc_trim()
            self.freed = 0

    def _freed_one(self) -> None:
        self.freed += 1

    def _set_gauges(self) -> None:
        self.counters.set("live_connections", self._holding())
        self.counters.set("live_kernel_pairs", getattr(self.relay, "live_pairs", 0))
        self.counters.set("loop_watchers", self.loop.activecnt)

    def _on_handover(self) -> None:
        """Leave as on a stop, but first hand what can outlive us to the kernel relay."""
        self._on_term(hand_over=True)

    def _on_term(self, hand_over: bool = False) -> None:
        # Stop accepting, but never shutdown() the listening socket: that would
        # reset its accept queue, which the master keeps for the next worker.
        self.alive = False
        self.handing_over = hand_over
        self.steering = None   # the slot's next worker counts from here
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        self._accept_what_waits()
        if hand_over and self.kernel is not None:   # a Chain, whose pairs can outlive us there
            self.relay.leaving()
        # Our copies only: the master keeps a slot that goes on for the next worker, and
        # one that a reload removed leaves SO_REUSEPORT's group now instead of when we exit.
        for _, listening in self.slot.listeners:
            listening.close()
        self.stopping.set()

    def _accept_what_waits(self) -> None:
        """Serve the connections already in the accept queue: when the master
        closes the last copy of a listening socket, whatever waits there is reset."""
        for lc, listening in self.slot.listeners:
            self._accept_all(lc, listening)

    def _stop_gracefully(self) -> None:
        """Serve what is in flight until graceful_timeout, then leave. Handing over to a
        successor, pairs the master keeps (kernel-relayed) do not hold us: another worker
        adopts them. On a stop there is none, and the master's copies end with it, so
        every pair we hold does, the kernel-relayed ones included."""
        self.alive = False
        timeout = self.cfg.master.graceful_timeout
        deadline = time.monotonic() + timeout
        still_held = (lambda: len(self.connections) - self._kept_connections()) if self.handing_over else \
            self._holding
        while still_held() > 0 and time.monotonic() < deadline:
            # Not a latch: the last connection may have left before the ones accepted at
            # TERM arrived (a probe that closed at once), and those must be served too.
            self.all_ended.clear()
            self.all_ended.wait(min(deadline - time.monotonic(), 0.1 if self.keeper is not None else math.inf))
        if still_held() > 0:
            log.warning("worker %d: %d connections still open after %.0fs, closing them",
                        self.index, still_held(), timeout)
        self.relay.close()
        os._exit(0)

    def _holding(self) -> int:
        """Connections we hold: our Connections, and the kernel pairs no Connection holds
        (adopted from another worker, or stowed: kernel_relay.py)."""
        return len(self.connections) + (self.kernel.unowned if self.kernel is not None else 0)

    def _kept_connections(self) -> int:
        """Our Connections whose pairs the master keeps (not the ones we adopted)."""
        return self.kernel.kept if self.kernel is not None else 0

    def _on_keeper(self) -> None:
        """Pairs of a worker that exited, handed to us by the master (keeper.py)."""
        from . import keeper
        while True:
            try:
                got = keeper.receive(self.keeper.sock)
            except (EOFError, OSError):
                return
            if got is None:
                return
            message, packed, fds = got
            if message.get("op") != "adopt" or self.kernel is None or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                continue
            self.kernel.adopt(packed, fds, self.ctx.limits)

    def _unowned_ended(self, record: dict, result) -> None:
        """The end of a kernel pair no Connection holds (adopted from another worker, or
        stowed here): its counters and log line. The record's up and down are what moved
        in userspace before the kernel took it."""
        from .connection import count_relayed
        started_at = record.pop("started_at", time.time())
        if record.pop("most", -1) > result.up + result.down:   # an earlier relay moved more (relay.Chain)
            result = result._replace(kind=record["relay"])
        count_relayed(self.ctx, record, result, up_before=record.get("up", 0), down_before=record.get("down", 0))
        record["duration"] = time.time() - started_at
        self.access_log.write(record)
        self._one_ended()

    def _watch_listeners(self) -> None:
        for (lc, listening), acceptor in zip(self.slot.listeners, self.acceptors):
            acceptor.start(self._accept_all, lc, listening, acceptor)

    def _accept_all(self, lc: ListenerConfig, listening: socket.socket, acceptor=None) -> None:
        """Start a Connection for everything waiting in the accept queue."""
        family = self.families[lc.address]
        limit = self.cfg.master.max_connections
        index = self.ctx.listener_slots[lc.address]
        counted = self.steering if index < STEER_LISTENERS_MAX else None   # past those, the hash places
        while True:
            if limit and self._holding() >= limit:
                return self._hold()
            try:
                fd, peer = listening._accept()
            except BlockingIOError:
                if self.steering is not None:
                    self.steering.holding(len(self.connections))
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and acceptor is not None:
                    now = time.monotonic()
                    if now - self.fd_errors_logged >= 1.0:
                        self.fd_errors_logged = now
                        log.error("accept on %s: %s; retrying every %.1fs", lc.address, e, ACCEPT_RETRY)
                    self._pause(acceptor, lc, listening)
                return
            # A C socket, not gevent's wrapper: connection.py waits on its descriptor itself.
            # It stays in blocking mode: every call on it passes MSG_DONTWAIT. It inherits
            # TCP_NODELAY from the listening socket.
            client = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            if counted is not None:
                counted.accepted(index)
            connection = self.Connection(self.ctx, lc, client, peer)
            self.connections.add(connection)
            connection.start()

    def _pause(self, acceptor, lc: ListenerConfig, listening: socket.socket) -> None:
        """Out of descriptors or memory: stop accepting for a moment instead of spinning."""
        acceptor.stop()
        timer = self.loop.timer(ACCEPT_RETRY)

        def resume() -> None:
            timer.close()
            if self.alive and not self.held:
                acceptor.start(self._accept_all, lc, listening, acceptor)
        timer.start(resume)

    def _hold(self) -> None:
        """Full (master.max_connections): stop accepting. What waits stays in the accept
        queue, never reset, until a connection ends (or another worker takes it over)."""
        if not self.held:
            self.held = True
            for acceptor in self.acceptors:
                acceptor.stop()

    def connection_ended(self, connection) -> None:
        self.connections.discard(connection)
        if self.steering is not None:
            self.steering.holding(len(self.connections))
        self._one_ended()

    def _one_ended(self) -> None:
        self._freed_one()
        if self.held and self.alive and self._holding() < self.cfg.master.max_connections:
            self.held = False
            self._watch_listeners()
        if not self.connections and not self.alive:
            self.all_ended.set()
