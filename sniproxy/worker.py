"""A worker: a gevent process serving its slot's listening sockets.

`Worker.__init__` runs in the master and has no side effects; `run()` runs in
the forked child. One greenlet per connection: read the first flight, route,
resolve, connect, replay the first flight, then hand both sockets to the relay.
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
        self.servers = [gevent.spawn(self._serve, lc, s) for lc, s in self.slot.listeners]
        gevent.spawn(self._heartbeat)
        try:
            gevent.joinall(self.servers, raise_error=True)
        finally:
            self._stop_gracefully()

    def _init_process(self) -> None:
        from gevent import monkey
        monkey.patch_all(thread=False, signal=False, subprocess=False)
        import gevent
        import gevent.pool
        import setproctitle

        from .access import AccessList
        from .connection import serve_connection
        from .resolver import Resolver
        from .routing import Router

        gevent.get_hub().loop.reinit()
        setproctitle.setproctitle(f"sniproxy: worker {self.index}")
        for sig in (signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.SIG_IGN)
        gevent.signal_handler(signal.SIGTERM, self._on_term)
        gevent.signal_handler(signal.SIGQUIT, lambda: os._exit(0))
        gevent.signal_handler(signal.SIGUSR1, self.access_log.reopen)

        self.serve_connection = serve_connection     # imported here, not on the first connection
        self.counters = CounterTable(self.counters_path).row(self.number)
        self.router = Router(self.cfg)
        self.access = AccessList(self.cfg.access.allow, self.cfg.access.deny)
        self.resolver = Resolver(self.cfg.resolver, self._dns_cache(), timeout=self.cfg.timeouts.connect)
        self.relay = self._open_relay()
        self.connections = gevent.pool.Group()
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
        import gevent
        self.alive = False
        gevent.killall(self.servers, block=False)
        gevent.spawn(self._accept_what_waits)

    def _accept_what_waits(self) -> None:
        """Serve the connections already in the accept queue: when the master
        closes the last copy of a listening socket, whatever waits there is reset."""
        for lc, listening in self.slot.listeners:
            while True:
                try:
                    accepted = _accept(listening)
                except OSError:
                    break
                if accepted is None:      # the queue is empty
                    break
                self.connections.spawn(self._handle, lc, *accepted)

    def _stop_gracefully(self) -> None:
        """Serve what is in flight until graceful_timeout, then leave."""
        self.alive = False
        timeout = self.cfg.master.graceful_timeout
        if not self.connections.join(timeout=timeout):
            log.warning("worker %d: %d connections still open after %.0fs, closing them",
                        self.index, len(self.connections), timeout)
        self.relay.close()
        os._exit(0)

    def _serve(self, lc: ListenerConfig, listening: socket.socket) -> None:
        import gevent
        hub = gevent.get_hub()
        readable = hub.loop.io(listening.fileno(), 1)
        try:
            while self.alive:
                try:
                    accepted = _accept(listening)
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        log.error("accept on %s: %s", lc.address, e)
                        gevent.sleep(0.1)
                    continue
                if accepted is None:
                    hub.wait(readable)
                else:
                    self.connections.spawn(self._handle, lc, *accepted)
        finally:
            readable.close()

    # --- one connection -------------------------------------------------------

    def _handle(self, lc: ListenerConfig, client: socket.socket, peer) -> None:
        start = time.monotonic()
        self.counters.add("accepted")
        record = self.serve_connection(self, lc, client, peer)
        record["duration"] = time.monotonic() - start
        self.access_log.write(record)


def _accept(listening: socket.socket) -> tuple[_socket.socket, tuple] | None:
    """One connection from a non-blocking listening socket, or None when none waits.
    The connection is a non-blocking C socket: the connection code waits on its
    descriptor itself, without gevent's socket wrapper."""
    try:
        fd, peer = listening._accept()
    except BlockingIOError:
        return None
    conn = _socket.socket(listening.family, socket.SOCK_STREAM, 0, fd)
    conn.setblocking(False)
    return conn, peer
