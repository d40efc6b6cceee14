"""A worker: a gevent process serving its slot's listening sockets.

`Worker.__init__` runs in the master and has no side effects; `run()` runs in
the forked child. Accepting and each connection's steps are event-loop
callbacks (connection.py): read the first flight, route, resolve, connect,
replay the first flight, then hand both sockets to the relay.
"""
from __future__ import annotations

import _socket
import errno
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass

from .config import Config, ListenerConfig, parse_hostport
from .counters import CounterTable

log = logging.getLogger("sniproxy.worker")

# Signals a worker handles itself: the master blocks them from fork until the
# worker's handlers are in place.
WORKER_SIGNALS = {signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}

# A worker that cannot boot exits with this, so the master halts instead of
# respawning it forever.
BOOT_ERROR = 3


@dataclass
class Slot:
    """What the master hands a worker: its listeners and their sockets."""
    listeners: list[tuple[ListenerConfig, socket.socket]]


class Worker:
    def __init__(self, cfg: Config, index: int, number: int, slot: Slot, *, relay_kind: str,
                 bpf_pins: str | None, heartbeat_fd: int, counters_path: str, access_log):
        self.cfg = cfg
        self.index = index           # slot, stable across respawns and reloads
        self.number = number         # spawn number, unique for the master's life
        self.slot = slot
        self.relay_kind = relay_kind
        self.bpf_pins = bpf_pins     # pin dir with DNS_CACHE (and the relay maps when kernel)
        self.heartbeat_fd = heartbeat_fd
        self.counters_path = counters_path
        self.access_log = access_log
        self.master_pid = os.getpid()   # __init__ runs in the master
        self.alive = True

    # --- in the child ---------------------------------------------------------

    def run(self) -> None:
        try:
            self._init_process()
        except Exception as e:  # noqa: BLE001 - any failure here means "cannot boot"
            log.error("worker %d cannot boot: %s", self.index, e)
            os._exit(BOOT_ERROR)
        import gevent
        for lc, listening in self.slot.listeners:
            acceptor = self.loop.io(listening.fileno(), 1)
            acceptor.start(self._accept_all, lc, listening, acceptor)
            self.acceptors.append(acceptor)
        gevent.spawn(self._heartbeat)
        self.stopping.wait()
        self._stop_gracefully()

    def _init_process(self) -> None:
        from gevent import monkey
        monkey.patch_all(thread=False, signal=False, subprocess=False)
        import gevent
        import gevent.event
        import setproctitle

        from .access import AccessList
        from .connection import Connection
        from .resolver import Resolver
        from .routing import Router

        gevent.get_hub().loop.reinit()
        setproctitle.setproctitle(f"sniproxy: worker {self.index}")
        for sig in (signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.SIG_IGN)
        gevent.signal_handler(signal.SIGTERM, self._on_term)
        gevent.signal_handler(signal.SIGQUIT, lambda: os._exit(0))
        gevent.signal_handler(signal.SIGUSR1, self.access_log.reopen)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)   # blocked by the master since fork

        self.Connection = Connection     # imported here, not on the first connection
        self.loop = gevent.get_hub().loop
        self.counters = CounterTable(self.counters_path).row(self.number)
        self.router = Router(self.cfg)
        self.access = AccessList(self.cfg.access.allow, self.cfg.access.deny)
        self.resolver = Resolver(self.cfg.resolver, self._dns_cache(), timeout=self.cfg.timeouts.connect)
        self.relay = self._open_relay()
        self.connections: set = set()   # live Connections
        self.acceptors: list = []
        self.stopping = gevent.event.Event()
        self.all_ended = gevent.event.Event()
        self.fallbacks = {id(lc): parse_hostport(lc.fallback) if lc.fallback else None
                          for lc, _ in self.slot.listeners}

    def _dns_cache(self):
        from .dns_cache import LocalDnsCache
        if self.bpf_pins and os.path.exists(os.path.join(self.bpf_pins, "DNS_CACHE")):
            from .dns_cache import PinnedDnsCache
            return PinnedDnsCache(self.bpf_pins)
        return LocalDnsCache(self.cfg.resolver.cache_size)

    def _open_relay(self):
        if self.relay_kind == "kernel":
            from .kernel_relay import KernelRelay
            from .relay import Handoff
            bpf = self.cfg.bpf
            handoff = Handoff(bpf.handoff_bytes, bpf.handoff_after) if bpf.handoff_bytes or bpf.handoff_after else None
            return KernelRelay(self.bpf_pins, max_queued=bpf.max_queued, sndbuf=bpf.sndbuf, handoff=handoff)
        from .relay import UserspaceRelay
        return UserspaceRelay()

    def _heartbeat(self) -> None:
        import gevent
        while True:              # until the process exits, draining included
            os.utime(self.heartbeat_fd)
            if os.getppid() != self.master_pid:
                log.warning("worker %d: master %d is gone, stopping", self.index, self.master_pid)
                self._on_term()
                return
            gevent.sleep(1.0)

    def _on_term(self) -> None:
        # Stop accepting, but never shutdown() the listening socket: that would
        # reset its accept queue, which the master keeps for the next worker.
        self.alive = False
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        self._accept_what_waits()
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
        """Serve what is in flight until graceful_timeout, then leave."""
        self.alive = False
        timeout = self.cfg.master.graceful_timeout
        if self.connections and not self.all_ended.wait(timeout):
            log.warning("worker %d: %d connections still open after %.0fs, closing them",
                        self.index, len(self.connections), timeout)
        self.relay.close()
        os._exit(0)

    def _accept_all(self, lc: ListenerConfig, listening: socket.socket, acceptor=None) -> None:
        """Start a Connection for everything waiting in the accept queue."""
        family = listening.family   # read once: it converts to an enum on every read
        while True:
            try:
                fd, peer = listening._accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and acceptor is not None:
                    log.error("accept on %s: %s", lc.address, e)
                    self._pause(acceptor, lc, listening)
                return
            # A C socket, not gevent's wrapper: connection.py waits on its descriptor itself.
            # It stays in blocking mode: every call on it passes MSG_DONTWAIT. It inherits
            # TCP_NODELAY from the listening socket.
            client = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            connection = self.Connection(self, lc, client, peer)
            self.connections.add(connection)
            connection.start()

    def _pause(self, acceptor, lc: ListenerConfig, listening: socket.socket) -> None:
        """Out of descriptors or memory: stop accepting for a moment instead of spinning."""
        acceptor.stop()
        timer = self.loop.timer(0.1)

        def resume() -> None:
            timer.close()
            if self.alive:
                acceptor.start(self._accept_all, lc, listening, acceptor)
        timer.start(resume)

    def connection_ended(self, connection) -> None:
        self.connections.discard(connection)
        if not self.connections and not self.alive:
            self.all_ended.set()
