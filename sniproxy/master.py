"""The master: holds the listening sockets and the BPF pins, keeps N workers alive.

The whole lifecycle reads top to bottom in `run()`. Signal handlers only
queue the signal and wake the loop; reaping, forking and logging happen in
the loop. Each worker slot has its own SO_REUSEPORT socket per listener, held
by the master, so a worker that dies leaves its accept queue to its successor.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import config as config_mod
from . import firstflight, keeper, metrics, privileges, systemd, userspace_relay
from .bpfsetup import BpfSetup, BpfSetupError
from .config import Config, ConfigError, parse_listen_address
from .counters import CounterTable
from .keeper import Keeper
from .runtime import RuntimePaths, alive, read_pid
from .worker import BOOT_ERROR, SIGNALS, TRIM_AFTER, Heartbeat, Slot, Worker, malloc_trim

log = logging.getLogger("sniproxy.master")
LISTEN_BACKLOG = 4096
KILL_GRACE = 2.0         # after SIGABRT, a stuck worker gets this long before SIGKILL
SWEEP_INTERVAL = 4.0     # relay entries of dead sockets go within two of these


class StartError(Exception):
    """The master cannot start; the message is the one line the user sees."""


def worker_count(cfg: Config) -> int:
    return cfg.master.workers or len(os.sched_getaffinity(0))


@dataclass
class WorkerProcess:
    pid: int
    index: int
    number: int
    generation: int
    heartbeat: Heartbeat
    aborted_at: float = 0.0


@dataclass
class Master:
    cfg: Config
    config_path: str | None
    ready_fd: int | None = None          # the starting `sniproxy-master start` waits on this
    workers: dict[int, WorkerProcess] = field(default_factory=dict)
    sockets: dict[tuple[int, str], socket.socket] = field(default_factory=dict)
    generation: int = 0
    spawned: int = 0
    signals: list[int] = field(default_factory=list)
    stopping: bool = False
    upgrading: bool = False   # SIGUSR2: once the workers are gone, re-execute (see handle_usr2)
    next_sweep: float = 0.0
    owner: tuple[int, int] | None = None   # (uid, gid) workers drop to: master.user, master.group
    ready_generation: int = -1             # the generation whose workers systemd was told are up
    worker_caps: set[int] = field(default_factory=set)   # the capabilities they keep
    metrics_server: metrics.MetricsServer | None = None  # on metrics.address, if it could bind
    worker_restarts: int = 0                             # what the metrics count, in the master
    reloads_ok: int = 0
    reloads_rejected: int = 0
    last_reload_at: float = field(default_factory=time.time)   # the start counts as one
    keeper: Keeper | None = None   # copies of the kernel-relayed pairs' sockets (kernel relay only)

    # --- lifecycle ------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped. `sniproxy-master start` hears "ok" once every worker has booted
        (tell_systemd_when_ready), or why the start failed: here, or a worker that cannot boot."""
        try:
            self.start()
            return self._serve()
        except StartError as e:
            self._tell_ready(f"error: {e}")
            raise

    def _serve(self) -> int:
        try:
            while True:
                self.reap_workers()
                if self.upgrading and not self.workers:
                    self._exec_upgrade()
                if self.stopping and not self.workers:
                    return 0
                self.keep_pairs()
                sig = self.next_signal(timeout=1.0 if self.ready_generation == self.generation else 0.05)
                if sig is not None:
                    getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}")()
                self.tell_systemd_when_ready()
                self.murder_late_workers()
                self.sweep_stale_pairs()
                if not self.stopping:
                    self.manage_workers()
        finally:
            self.cleanup()

    def start(self) -> None:
        import setproctitle
        setproctitle.setproctitle(f"sniproxy: master {self.config_path or '(built-in config)'}")
        self.paths = RuntimePaths.of(self.cfg, self.config_path)
        self._claim_pidfile()
        _raise_file_limit()
        CounterTable(self.paths.counters, create=True)
        self.counters_path = str(self.paths.counters)
        self._install_signals()
        upgraded = _take_upgrade_state()
        if upgraded is not None:   # what the image before this one handed over
            self.sockets = {(slot, address): socket.socket(fileno=fd) for slot, address, fd in upgraded["sockets"]}
            self.spawned, self.generation = upgraded["spawned"], upgraded["generation"] + 1
        self.bind_listeners(self.cfg)
        self.bpf = BpfSetup(self.cfg)
        try:
            self.bpf.start(reuse_pins=upgraded["xdp"] if upgraded is not None else None)
        except BpfSetupError as e:
            raise StartError(str(e)) from None
        self.bpf.steer(self.sockets)
        malloc_trim()   # what compiling the programs took and freed (some 50 MB with BCC's LLVM)
        self._set_owner()
        if self.bpf.relay_kind == "kernel":
            self.keeper = Keeper()
            if upgraded is not None:
                self.keeper.take_over(upgraded["kept"])
        if upgraded is not None:
            log.info("upgraded: master %d now runs the code on disk, with %d kept pairs", os.getpid(),
                     len(upgraded["kept"]))
        self.metrics_server = metrics.start(self.cfg.metrics.address, self)   # before the first fork
        interpreted = [what for what, built in (("the first-flight parser", firstflight.COMPILED),
                                                ("the copy and splice relays' pairs", userspace_relay.copypair is not None))
                       if not built]
        if interpreted:
            log.warning("%s not compiled (scripts/setup builds them): interpreted, at more CPU per connection",
                        " and ".join(interpreted))
        log.info("master %d: %d workers, relay in %s, listening on %s", os.getpid(), worker_count(self.cfg),
                 self.bpf.relay_kind, ", ".join(lc.address for lc in self.cfg.listener))
        self.manage_workers()

    def cleanup(self) -> None:
        self.signal_workers(signal.SIGKILL)   # only those left after a stop or a failed start
        for w in self.workers.values():
            os.waitpid(w.pid, 0)
        self.workers.clear()
        if self.keeper is not None:   # stopping: the pairs it kept end with us
            self.keeper.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if getattr(self, "bpf", None):
            self.bpf.stop()
        paths = getattr(self, "paths", None)
        if paths is not None and read_pid(paths.pidfile) in (os.getpid(), None):
            for path in (paths.pidfile, paths.state):
                path.unlink(missing_ok=True)

    # --- signals: queued by the handler, handled in the loop -------------------

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wake_w)
        for sig in SIGNALS:
            signal.signal(sig, lambda s, _frame: self.signals.append(s))

    def next_signal(self, timeout: float) -> int | None:
        if not self.signals:
            # poll, not select: with thousands of kept sockets, channel fds pass FD_SETSIZE.
            waiting = select.poll()
            for fd in [self._wake_r] + (self.keeper.fds() if self.keeper else []):
                waiting.register(fd, select.POLLIN)
            waiting.poll(timeout * 1000)
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return self.signals.pop(0) if self.signals else None

    def handle_chld(self) -> None:
        pass                               # reaped at the top of the loop

    def handle_term(self) -> None:
        """Graceful stop: workers stop accepting and finish within graceful_timeout."""
        if self.stopping:
            return
        log.info("stopping gracefully (up to %.0fs)", self.cfg.master.graceful_timeout)
        systemd.notify("STOPPING=1", "STATUS=stopping gracefully")
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.master.graceful_timeout + KILL_GRACE
        self.signal_workers(signal.SIGTERM)

    handle_int = handle_term

    def handle_quit(self) -> None:
        log.info("fast stop")
        systemd.notify("STOPPING=1", "STATUS=fast stop")
        self.stopping = True
        self.stop_deadline = time.monotonic() + KILL_GRACE
        self.signal_workers(signal.SIGQUIT)

    def handle_usr2(self) -> None:
        """Upgrade: re-execute this master with the code now on disk, keeping its pid,
        the listening sockets (connections wait in their queues), the pins and the
        kernel-relayed pairs (keeper.py). The workers leave first, as on a reload, handing
        their pairs to the kernel relay; pairs the master keeps go on relaying meanwhile, and
        the new workers adopt them."""
        if self.stopping:
            return
        problem = self._upgrade_problem()
        if problem:
            log.error("upgrade refused: %s", problem)
            return
        log.info("upgrading: stopping the workers, then re-executing")
        self.stopping = self.upgrading = True
        self.stop_deadline = time.monotonic() + self.cfg.master.graceful_timeout
        systemd.notify("RELOADING=1", "STATUS=upgrading")
        self.signal_workers(signal.SIGUSR2)   # they leave, handing their pairs to the kernel relay

    def _upgrade_problem(self) -> str | None:
        """Why the code on disk cannot take over: it fails to start, reads another
        config, or lays out the pinned maps differently."""
        import subprocess
        import sys
        argv = [sys.executable, "-c", "from sniproxy.kernel_abi import LAYOUT_VERSION; print(LAYOUT_VERSION)"]
        try:
            version = int(subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout)
            config_mod.load(self.config_path)
        except (OSError, ValueError, subprocess.SubprocessError, ConfigError) as e:
            return str(e).splitlines()[0] if str(e) else type(e).__name__
        pinned = self.bpf.layout_version()
        if pinned is not None and version != pinned:
            return f"the pinned maps have layout {pinned}, the code on disk uses {version}: stop and start instead"
        return None

    def _exec_upgrade(self) -> None:
        import sys
        fds = [sock.fileno() for sock in self.sockets.values()]
        kept = self.keeper.orphan_states() if self.keeper is not None else []
        state = {"sockets": [[slot, address, sock.fileno()] for (slot, address), sock in self.sockets.items()],
                 "kept": [[s, fds_] for s, fds_ in kept], "xdp": self.bpf.xdp_attached,
                 "spawned": self.spawned, "generation": self.generation}
        for fd in fds + [fd for _, fds_ in kept for fd in fds_]:
            os.set_inheritable(fd, True)
        path = self.paths.state.with_suffix(".upgrade")
        path.write_text(json.dumps(state))
        if self.metrics_server is not None:
            self.metrics_server.stop()
        os.environ[UPGRADE_ENV] = str(path)
        argv = [sys.executable, "-m", "sniproxy.cli", "start", "--foreground"]
        argv += ["-c", self.config_path] if self.config_path else []
        log.info("re-executing %s", " ".join(argv))
        os.execv(sys.executable, argv)

    def handle_usr1(self) -> None:
        self.signal_workers(signal.SIGUSR1)

    def handle_hup(self) -> None:
        """Reload: new workers with the new config; the old ones drain their connections."""
        systemd.notify("RELOADING=1", systemd.monotonic_usec(), "STATUS=reloading")
        try:
            cfg = config_mod.load(self.config_path) if self.config_path else config_mod.load()
            self.bind_listeners(cfg)
        except (ConfigError, OSError, StartError) as e:
            reason = str(e).replace("\n", "; ")
            log.error("reload rejected, keeping the running config: %s", reason)
            self.reloads_rejected += 1
            systemd.notify("READY=1", f"STATUS=reload rejected: {reason}")
            return
        for key in ("pin_path", "mode"):
            if getattr(cfg.bpf, key) != getattr(self.cfg.bpf, key):
                log.warning("bpf.%s changed: takes effect at the next start", key)
        self.cfg = cfg
        self.reloads_ok += 1          # before a new metrics server can be scraped
        self.last_reload_at = time.time()
        if self.metrics_server is None or self.metrics_server.address != cfg.metrics.address:
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.metrics_server = metrics.start(cfg.metrics.address, self)
        self.bpf.reload(cfg)
        self.bpf.steer(self.sockets)
        self._set_owner()
        self.generation += 1
        old = [w for w in self.workers.values() if w.generation < self.generation]
        self.manage_workers()
        for w in old:   # they leave, handing their pairs to the kernel relay
            _kill(w.pid, signal.SIGUSR2)
        log.info("reloaded %s: %d workers", self.config_path or "(built-in config)", worker_count(cfg))

    # --- listening sockets ------------------------------------------------------

    def bind_listeners(self, cfg: Config) -> None:
        """One SO_REUSEPORT socket per slot and listener; keep the ones that still serve."""
        wanted = {(i, lc.address) for i in range(worker_count(cfg)) for lc in cfg.listener}
        fresh = {}
        try:
            for key in sorted(wanted - self.sockets.keys()):
                if not any(addr == key[1] for _, addr in self.sockets) and not any(a == key[1] for _, a in fresh):
                    _check_port_free(key[1])
                fresh[key] = _reuseport_socket(key[1])
        except StartError:
            for sock in fresh.values():
                sock.close()
            raise
        for key in self.sockets.keys() - wanted:
            self.sockets.pop(key).close()
        self.sockets.update(fresh)

    # --- workers ----------------------------------------------------------------

    def manage_workers(self) -> None:
        current = {w.index for w in self.workers.values() if w.generation == self.generation}
        missing = [index for index in range(worker_count(self.cfg)) if index not in current]
        for index in missing:
            self.spawn_worker(index)
        if missing:   # `status` lists the new pids
            self.write_state()

    def spawn_worker(self, index: int) -> None:
        self.spawned += 1
        heartbeat = Heartbeat()
        listeners = [(lc, self.sockets[(index, lc.address)]) for lc in self.cfg.listener]
        master_end, worker_end = keeper.channel() if self.keeper is not None else (None, None)
        inherited = self._fds_not_for(index) + ([master_end.fileno()] if master_end is not None else [])
        worker = Worker(self.cfg, index, self.spawned, Slot(listeners), relay_kind=self.bpf.relay_kind,
                        bpf_pins=self.bpf.pins_for_workers, heartbeat=heartbeat,
                        counters_path=self.counters_path, inherited=inherited,
                        owner=self.owner, caps=self.worker_caps, keeper=worker_end)
        # Until the child has its own handlers, a signal would run the master's, which
        # only queue it in the child's copy of the master: a worker stopped while
        # booting would never stop. Blocked, it waits for the worker's handlers.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid == 0:
            # The child must never return into the master's loop or run its atexit
            # handlers (BCC's would close the master's BPF objects; bpfload's
            # at-fork hook has already unregistered them in this child).
            try:
                worker.run()
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[pid] = WorkerProcess(pid, index, self.spawned, self.generation, heartbeat)
        if self.keeper is not None:
            worker_end.close()
            self.keeper.add_worker(pid, master_end)

    def _set_owner(self) -> None:
        self.owner = privileges.ids(self.cfg.master.user, self.cfg.master.group)
        self.worker_caps = set()
        if self.owner is not None:
            self._give_files_to_workers()
            if self.bpf.pins_for_workers:
                self.worker_caps = privileges.kernel_relay_needs(self.bpf.pins_for_workers, self.owner)

    def _give_files_to_workers(self) -> None:
        """What workers open by path, given to master.user: the pins, the counters, the access log."""
        paths = [self.paths.counters]
        if self.cfg.log.access not in ("", "-"):
            Path(self.cfg.log.access).touch()
            paths.append(self.cfg.log.access)
        pins = self.bpf.pins_for_workers
        if pins:
            paths += [pins] + [os.path.join(pins, name) for name in os.listdir(pins)]
        privileges.give(paths, self.owner)

    def _fds_not_for(self, index: int) -> list[int]:
        """What a worker of slot index inherits and must close: the master's pipes,
        the other workers' heartbeats, the other slots' listening sockets, the metrics socket."""
        fds = [self._wake_r, self._wake_w] + [w.heartbeat.fd for w in self.workers.values()]
        fds += [self.metrics_server.fileno()] if self.metrics_server is not None else []
        fds += [sock.fileno() for (slot, _), sock in self.sockets.items() if slot != index]
        fds += self.keeper.kept_fds() if self.keeper is not None else []
        return fds + ([self.ready_fd] if self.ready_fd is not None else [])

    def keep_pairs(self) -> None:
        """Take the workers' keeps and drops; hand the pairs of exited workers to live
        ones at once (the kernel relays them meanwhile, but nothing watches them)."""
        if self.keeper is None:
            return
        self.keeper.poll()
        if self.keeper.messages >= TRIM_AFTER:   # what its messages took and let go
            self.keeper.messages = 0
            malloc_trim()
        if not self.stopping:
            self.keeper.hand_over([w.pid for w in self.workers.values() if w.generation == self.generation])

    def signal_workers(self, sig: int) -> None:
        for w in self.workers.values():
            _kill(w.pid, sig)

    def reap_workers(self) -> None:
        reaped = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.heartbeat.close()
            if self.keeper is not None:
                self.keeper.worker_exited(pid)
            reaped = True
            code = os.waitstatus_to_exitcode(status)
            if code == BOOT_ERROR:
                raise StartError(f"worker {w.index} failed to boot; see the log above")
            if not self.stopping and w.generation == self.generation:
                log.warning("worker %d (pid %d) exited with %s; replacing it", w.index, pid, _describe_exit(code))
                self.worker_restarts += 1
        if reaped:   # `status` must not list the dead
            self.write_state()

    def murder_late_workers(self) -> None:
        now = time.monotonic()
        if self.stopping and now > self.stop_deadline:
            self.signal_workers(signal.SIGKILL)
            return
        timeout = self.cfg.master.worker_timeout
        for w in self.workers.values():
            late = w.heartbeat.age()
            if late <= timeout:
                continue
            if not w.aborted_at:
                log.error("worker %d (pid %d) missed its heartbeat for %.0fs; aborting it", w.index, w.pid, late)
                w.aborted_at = now
                _kill(w.pid, signal.SIGABRT)
            elif now - w.aborted_at > KILL_GRACE:
                _kill(w.pid, signal.SIGKILL)

    def tell_systemd_when_ready(self) -> None:
        """READY=1 once every worker of the current generation has booted (at start, and
        after each reload); at start, also the "ok" that `sniproxy-master start` waits for."""
        if self.ready_generation == self.generation or self.stopping:
            return
        current = [w for w in self.workers.values() if w.generation == self.generation]
        if len(current) == worker_count(self.cfg) and all(w.heartbeat.booted for w in current):
            self.ready_generation = self.generation
            self.write_state()
            self._tell_ready("ok")
            systemd.notify("READY=1", f"STATUS={len(current)} workers, relay {self.bpf.relay_kind}, "
                                      f"listening on {', '.join(lc.address for lc in self.cfg.listener)}")

    def sweep_stale_pairs(self) -> None:
        now = time.monotonic()
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL
            try:
                self.bpf.sweep_stale_pairs()
            except OSError as e:
                log.warning("sweeping stale relay entries: %s", e)

    # --- files for the other commands -----------------------------------------

    def _claim_pidfile(self) -> None:
        pidfile = self.paths.pidfile
        other = read_pid(pidfile)
        if other and alive(other) and other != os.getpid():
            raise StartError(f"already running as pid {other} (pidfile {pidfile})")
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")

    def write_state(self) -> None:
        state = {
            "pid": os.getpid(), "config": self.config_path, "relay": self.bpf.relay_kind,
            "ready": self.ready_generation == self.generation,   # every current worker has booted
            "pin_path": self.cfg.bpf.pin_path, "counters": self.counters_path,
            "bpf": self.bpf.describe(),
            "workers": sorted(({"pid": w.pid, "index": w.index, "number": w.number, "generation": w.generation}
                               for w in self.workers.values()), key=lambda w: (w["index"], w["generation"])),
        }
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.paths.state)

    def _tell_ready(self, message: str) -> None:
        if self.ready_fd is not None:
            os.write(self.ready_fd, message.encode() + b"\n")
            os.close(self.ready_fd)
            self.ready_fd = None


UPGRADE_ENV = "SNIPROXY_UPGRADE_STATE"


def _raise_file_limit() -> None:
    """Every relayed connection takes two fds in a worker, and a kernel-relayed one two
    more in the master (keeper.py): the soft limit (1024 under systemd) goes up to the
    hard one, and the hard one to the kernel's nr_open where the master may
    (CAP_SYS_RESOURCE). Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        most = int(Path("/proc/sys/fs/nr_open").read_text())
        if hard < most:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, most))
            return
    except (OSError, ValueError):   # not allowed: the hard limit stays
        pass
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _take_upgrade_state() -> dict | None:
    """The state a master handed over when it re-executed itself (handle_usr2)."""
    path = os.environ.pop(UPGRADE_ENV, None)
    if path is None:
        return None
    try:
        state = json.loads(Path(path).read_text())
    finally:
        Path(path).unlink(missing_ok=True)
    return state


DEFER_ACCEPT = 1   # seconds: the kernel's SYN-ACK retransmissions before it accepts a silent client


def _reuseport_socket(address: str) -> socket.socket:
    hp = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit it: one setsockopt per listener, not per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Every listener's client speaks first (a ClientHello, a request): accept returns
        # with it queued, so a worker reads it at once instead of waiting for it. A client
        # that sends nothing is accepted after one SYN-ACK retransmission (a second), and
        # its timeouts.client_hello starts then. Measured: bench/results/2026-11-28-setup.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((hp.host, hp.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise StartError(f"cannot listen on {address}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def _check_port_free(address: str) -> None:
    """SO_REUSEPORT would silently join another root process's group: bind once without it."""
    hp = parse_listen_address(address)
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((hp.host, hp.port))
        except OSError as e:
            reason = "the port is in use" if e.errno == errno.EADDRINUSE else e.strerror
            raise StartError(f"cannot listen on {address}: {reason}") from None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
