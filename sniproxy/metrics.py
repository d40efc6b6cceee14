"""Prometheus exposition (metrics.address), served by the master from a thread of its own.

collect() reads every source at scrape time: the workers' shared counter table,
the pinned per-CPU BPF maps, SOCK_MAP, and the master's own state. Nothing asks a
worker, so a scrape costs the workers nothing and answers while they are busy.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from .config import parse_listen_address
from .counters import REFUSAL_REASONS, REGISTRATION, REGISTRATION_BUCKETS, CounterTable
from .kernel_abi import PERCPU_COUNTERS, RELAY_STATS, SOCK_MAP, XDP_STATS
from .stats import percpu_totals

log = logging.getLogger("sniproxy.metrics")


def _version() -> str:
    try:
        return importlib.metadata.version("sniproxy")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class MasterCollector(Collector):
    """Everything the master can see, read when Prometheus asks. `master` is the
    running Master: its workers, counters path, BpfSetup and reload counts."""

    def __init__(self, master):
        self.master = master
        self.table: CounterTable | None = None
        self.version = _version()

    def collect(self):
        m = self.master
        workers = tuple(m.workers.values())   # a copy: the master's loop changes the dict
        if self.table is None:
            self.table = CounterTable(m.counters_path)
        c = self.table.totals()

        yield _counter("connections_accepted", "Connections accepted by the workers.", c["accepted"])
        by_listener = CounterMetricFamily(
            "sniproxy_listener_connections", "Connections by listener (the first 16 [[listener]] tables, by their "
            "place in the config) and result: accepted, relayed (ended after a relay) or refused.",
            labels=("listener", "result"))
        listeners = m.cfg.listener
        for lc, counts in zip(listeners, self.table.listener_totals(len(listeners))):
            for result, value in counts.items():
                by_listener.add_metric((lc.address, result), value)
        yield by_listener
        reg = self.table.totals(REGISTRATION)
        cumulative, buckets = 0, []
        for le, name in zip((*map(str, REGISTRATION_BUCKETS), "+Inf"), REGISTRATION[:-1]):
            cumulative += reg[name]
            buckets.append((le, cumulative))
        yield HistogramMetricFamily("sniproxy_kernel_registration_seconds", "Time the kernel relay took to register "
                                    "a pair (drain, baselines, map updates, kick), in the worker.",
                                    buckets=buckets, sum_value=reg["registration_sum_us"] / 1e6)
        ended = CounterMetricFamily(
            "sniproxy_connections", "Connections that ended, by outcome: relayed (relay = kernel, splice or userspace, "
            "whichever carried the bulk), refused (reasons in sniproxy_refusals_total), closed_early (the "
            "client left before its first flight was complete) or error; relay = none unless relayed.",
            labels=("outcome", "relay"))
        ended.add_metric(("relayed", "kernel"), c["relayed_kernel"])
        ended.add_metric(("relayed", "userspace"), c["relayed_userspace"])
        ended.add_metric(("relayed", "splice"), c["relayed_splice"])
        ended.add_metric(("refused", "none"), sum(c[f"refused_{r}"] for r in REFUSAL_REASONS))
        ended.add_metric(("closed_early", "none"), c["closed_early"])
        ended.add_metric(("error", "none"), c["errors"])
        yield ended
        refusals = CounterMetricFamily("sniproxy_refusals", "Connections refused, by reason.", labels=("reason",))
        for r in REFUSAL_REASONS:
            refusals.add_metric((r,), c[f"refused_{r}"])
        yield refusals
        yield _counter("fallback_connections", "Connections sent to their listener's fallback.", c["fallback"])
        lookups = CounterMetricFamily("sniproxy_dns_cache_lookups", "Names of backends looked up (named or "
                                      "\"*\" backends), by result: hit (the shared DNS cache answered) or miss.",
                                      labels=("result",))
        lookups.add_metric(("hit",), c["dns_cache_hits"])
        lookups.add_metric(("miss",), c["dns_cache_misses"])
        yield lookups
        cut = CounterMetricFamily(
            "sniproxy_relays_cut", "Relayed connections the proxy ended itself: idle_timeout (nothing moved "
            "for timeouts.idle or half_closed) or slow_reader (a side left too much unread).", labels=("reason",))
        for reason in ("idle_timeout", "slow_reader"):
            cut.add_metric((reason,), c[reason])
        yield cut
        moves = CounterMetricFamily(
            "sniproxy_relay_moves", "Pairs moved to another relay by relay.policy = \"auto\", by the relay "
            "they moved to: splice at a sustained high rate, the kernel when quiet, copy from splice when "
            "the rate fell.", labels=("to",))
        for to in ("copy", "splice", "kernel"):
            moves.add_metric((to,), c[f"moved_to_{to}"])
        yield moves
        yield _counter("kernel_maps_full", "Pairs the kernel relay could not take, its maps being full "
                       "(bpf.max_pairs): they were relayed in userspace.", c["kernel_maps_full"])
        yield _counter("kernel_batched", "Times a kernel-relayed pair, fast in small skbs, began to run its "
                       "verdict in batches (bpf.batch_bytes).", c["kernel_batched"])

        relayed = CounterMetricFamily(
            "sniproxy_relayed_bytes", "Bytes relayed, by direction (up: client to backend, first flight "
            "included; down: backend to client) and relay. userspace is added when a connection ends; kernel "
            "is the verdict's RELAY_STATS, counted as bytes pass.", labels=("direction", "relay"))
        relayed.add_metric(("up", "userspace"), c["bytes_up_userspace"])
        relayed.add_metric(("down", "userspace"), c["bytes_down_userspace"])
        kernel = self._read_kernel()
        if kernel is not None:
            stats, entries, xdp = kernel
            relayed.add_metric(("up", "kernel"), stats["up_bytes"])
            relayed.add_metric(("down", "kernel"), stats["down_bytes"])
            yield _counter("kernel_redirect_failures", "Buffers (skbs) the verdict could not redirect, "
                           "having no pair or no peer: left on the socket for userspace.", stats["redirect_failures"])
            yield _counter("kernel_trimmed_bytes", "Bytes TCP delivered twice (a retransmission overlapping "
                           "bytes already received) that the verdict cut instead of relaying again.",
                           stats["trimmed_bytes"])
            yield _counter("kernel_trim_failures", "Buffers whose repeated bytes the verdict could not cut: "
                           "their pairs were reset.", stats["trim_failures"])
            yield _gauge("kernel_map_pairs", "Pairs in the kernel's SOCK_MAP now (its entries / 2), as the "
                         "kernel sees them.", entries // 2)
            if xdp is not None:
                packets = CounterMetricFamily("sniproxy_xdp_packets", "Packets the XDP source filter saw, by "
                                              "result: passed, dropped_deny, dropped_not_allowed.",
                                              labels=("result",))
                for result, value in xdp.items():
                    packets.add_metric((result,), value)
                yield packets
        yield relayed

        gauges = [self.table.gauges(w.number) for w in workers]
        yield _gauge("live_connections", "Connections open in the workers now (each worker sets its own "
                     "once a second).", sum(g["live_connections"] for g in gauges))
        yield _gauge("live_kernel_pairs", "Pairs the workers' kernel relays watch now, as the workers count "
                     "them (once a second).", sum(g["live_kernel_pairs"] for g in gauges))
        yield _gauge("workers", "Worker processes alive, draining ones of an older config included.", len(workers))
        yield _counter("worker_restarts", "Workers of the running config that exited and were replaced "
                       "(crash, kill, missed heartbeat); reloads and stops do not count.", m.worker_restarts)
        reloads = CounterMetricFamily("sniproxy_reloads", "Reloads (SIGHUP), by result: ok, or rejected (the "
                                      "running config stays).", labels=("result",))
        reloads.add_metric(("ok",), m.reloads_ok)
        reloads.add_metric(("rejected",), m.reloads_rejected)
        yield reloads
        yield _gauge("last_reload_success_timestamp_seconds", "Unix time of the last successful reload, "
                     "or of the start.", m.last_reload_at)
        info = InfoMetricFamily("sniproxy_build", "The running sniproxy's version.")
        info.add_metric((), {"version": self.version})
        yield info

    def _read_kernel(self):
        """(RELAY_STATS, SOCK_MAP entries, XDP_STATS or None), or None when nothing is
        pinned (the relay is userspace) or the pins cannot be read."""
        pins = self.master.bpf.pins_for_workers
        if not pins:
            return None
        from .bpfsys import PinnedMap
        try:
            stats = percpu_totals(os.path.join(pins, RELAY_STATS), PERCPU_COUNTERS[RELAY_STATS])
            with PinnedMap.open(os.path.join(pins, SOCK_MAP)) as sock_map:
                # One syscall per entry (a sockhash has no batch lookup): ~75 ms at 10,000 pairs.
                entries = len(sock_map)
            xdp = percpu_totals(os.path.join(pins, XDP_STATS), PERCPU_COUNTERS[XDP_STATS])
        except OSError as e:   # the pins went away under us: serve the rest
            log.warning("metrics: cannot read the pinned maps in %s: %s", pins, e)
            return None
        return (stats, entries, xdp) if stats is not None else None


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"sniproxy_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"sniproxy_{name}", doc, value=value)


# --- the server -------------------------------------------------------------------

_scrapes: set[int] = set()   # fds of the scrapes being answered now


def _close_scrapes_in_child() -> None:
    """A fork copies fds, not threads: a scrape answered while the master forks a worker
    would stay open in that worker for its whole life. (The listening socket is closed
    there with the master's other fds: Master._fds_not_for.)"""
    for fd in _scrapes:
        try:
            os.close(fd)
        except OSError:
            pass
    _scrapes.clear()


os.register_at_fork(after_in_child=_close_scrapes_in_child)


class _Handler(WSGIRequestHandler):
    timeout = 10.0   # a client that sends nothing gives its thread back

    def log_message(self, *args) -> None:
        pass


class MetricsServer(ThreadingWSGIServer):
    address = ""   # metrics.address, as configured

    def get_request(self):
        conn, peer = super().get_request()
        _scrapes.add(conn.fileno())
        return conn, peer

    def shutdown_request(self, request) -> None:
        _scrapes.discard(request.fileno())
        super().shutdown_request(request)

    def stop(self) -> None:
        self.shutdown()       # waits for serve_forever's poll to notice
        self.server_close()


class _MetricsServerV6(MetricsServer):
    address_family = socket.AF_INET6


def start(address: str, master) -> MetricsServer | None:
    """Serve /metrics on address from a daemon thread; None when address is "" or
    cannot be bound (one warning: the proxy runs on without metrics)."""
    if not address:
        return None
    hp = parse_listen_address(address)
    server_class = _MetricsServerV6 if ":" in hp.host else MetricsServer
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))
    try:
        server = make_server(hp.host, hp.port, make_wsgi_app(registry), server_class, handler_class=_Handler)
    except OSError as e:
        log.warning("metrics: cannot listen on %s (%s): running without metrics", address, e.strerror or e)
        return None
    server.address = address
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25}, name="metrics",
                     daemon=True).start()
    log.info("metrics on http://%s/metrics", address)
    return server
