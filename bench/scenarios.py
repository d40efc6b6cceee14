"""The scenarios. Each turns into steps (one progress line each); a step returns one
value per metric for one repeat. Every path goes through a routing decision: SNI
for TLS clients, a listener's fallback for the others."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from bench import measure, procs, tools
from sniproxy.config import RelayConfig
from bench.origins import OBJECTS
from bench.systems import System

HIGHER, LOWER = "higher", "lower"


@dataclass(frozen=True)
class Settings:
    repeats: int
    seconds: int                                # per tool run; iperf3 and sockperf take whole seconds
    bulk_variants: tuple[tuple[int, bool], ...]  # (streams, reverse)
    download_bytes: int
    idle_connections: int
    baseline_seconds: float
    slack: float          # how long past its nominal duration a stalled tool or wait may take
    rounds: int           # of a scenario whose systems run together and take turns (together)


# full: 3 repeats of 5 s keep the whole run near 15 minutes on 2 vCPUs.
MODES = {
    "full": Settings(3, 5, ((1, False), (1, True), (4, False), (4, True)), 1 << 30, 10_000, 3.0, 20.0, 9),
    "quick": Settings(1, 1, ((1, False), (4, True)), 256 << 20, 1_000, 1.0, 8.0, 2),
    "smoke": Settings(1, 1, ((1, False),), 32 << 20, 100, 0.5, 3.0, 1),
}


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: str


@dataclass(frozen=True)
class Step:
    label: str
    estimate: float                         # seconds, for the ETA
    action: Callable[[], dict[str, float]]  # metric name -> value


@dataclass(frozen=True)
class Context:
    settings: Settings
    workdir: Path
    hold_port: int     # the origin port that idle connections end at


EVERY = ("*",)   # together: every system of the run


class Scenario:
    name = ""
    step_estimate = 2.0
    # None: each system alone, started for the scenario's repeat and stopped after. Else the
    # names of the systems (or EVERY) that run together, with `workers` each, and take turns,
    # round after round (bench/run's run_together).
    together: tuple[str, ...] | None = None
    workers = 1
    # Systems that run together: each round starts with a turn that is not counted, where the
    # first turn after another scenario runs slow whichever system takes it.
    warm_up = False

    def rounds(self, settings: Settings) -> int:
        """How many turns each system takes, when the systems run together."""
        return settings.rounds

    def metrics(self, system: System, settings: Settings) -> list[Metric]:
        raise NotImplementedError

    def measure(self, system: System, ctx: Context) -> dict[str, float]:
        """One repeat of every metric."""
        raise NotImplementedError

    def steps(self, system: System, ctx: Context, repeat: int) -> list[Step]:
        """The steps of one repeat (0-based): the run takes every system through repeat 0,
        then every system through repeat 1, so that a drift of the machine over the run
        shows in every system alike."""
        return [Step(f"repeat {repeat + 1}/{ctx.settings.repeats}", self.estimate(ctx.settings),
                     partial(self.measure, system, ctx))]

    def estimate(self, settings: Settings) -> float:
        return settings.seconds + 1.0


class TakingTurns(Scenario):
    """A scenario that every system runs together for, each taking its turn, once per repeat:
    a drift of the machine over minutes (whole repeats moved by 20-40% on 2 vCPUs, and no
    sequence of systems run alone could rank them within that) then hits every system alike,
    at the cost of the sequential runs. The targets are read from these."""
    together = EVERY

    def rounds(self, settings):
        return settings.repeats


def cpu_metrics(system: System) -> list[Metric]:
    own = [Metric("cpu_proc_s_per_gb", "CPU-s/GB", LOWER)] if system.has_processes else []
    return own + [Metric("cpu_total_s_per_gb", "CPU-s/GB", LOWER),
                  Metric("ctx_switches_per_gb", "switches/GB", LOWER)]


def cpu_per_gb(meter: measure.CpuMeter, relayed_bytes: int, system: System) -> dict[str, float]:
    """The system's own CPU, that of everything taking part, and the machine's context
    switches, per GB relayed."""
    own, total = meter.read()
    gigabytes = relayed_bytes / 1e9
    values = {"cpu_total_s_per_gb": total / gigabytes, "ctx_switches_per_gb": meter.switches() / gigabytes}
    if system.has_processes:
        values["cpu_proc_s_per_gb"] = own / gigabytes
    return values


def bulk_metric(streams: int, reverse: bool) -> str:
    return f"gbps_{streams}stream{'s' if streams > 1 else ''}{'_reverse' if reverse else ''}"


class Bulk(TakingTurns):
    """iperf3 through the fallback route, Gbit/s."""
    name = "bulk"

    def metrics(self, system, settings):
        return [Metric(bulk_metric(*v), "Gbit/s", HIGHER) for v in settings.bulk_variants] + cpu_metrics(system)

    def estimate(self, settings):
        return len(settings.bulk_variants) * (settings.seconds + 0.5)

    def measure(self, system, ctx):
        meter = measure.CpuMeter(system.pids())
        values, relayed = {}, 0
        for streams, reverse in ctx.settings.bulk_variants:
            result = tools.iperf3(system.address("iperf"), ctx.settings.seconds, streams, reverse,
                                  ctx.settings.slack)
            values[bulk_metric(streams, reverse)] = result.rate
            relayed += result.bytes
        return values | cpu_per_gb(meter, relayed, system)


class TlsDownload(TakingTurns):
    """One large HTTPS download from the TLS origin routed by SNI, MB/s."""
    name = "tls_download"
    # In full11 (2026-11-29) the first download of each round, right after the bulk turns, made
    # 358-514 MB/s whichever system took it (direct, auto, kernel), against 724-1,035 for the
    # turns after it; in full10, direct came first every round and made 261-359.
    warm_up = True

    def metrics(self, system, settings):
        return [Metric("mb_per_s", "MB/s", HIGHER)] + cpu_metrics(system)

    def estimate(self, settings):
        return 0.5 + settings.download_bytes / 400e6

    def measure(self, system, ctx):
        meter = measure.CpuMeter(system.pids())
        result = tools.curl_download(system.address("tls"), ctx.settings.download_bytes, ctx.settings.slack)
        return {"mb_per_s": result.rate} | cpu_per_gb(meter, result.bytes, system)


class Latency(TakingTurns):
    """sockperf 64-byte ping-pong through the fallback route, round trip in us."""
    name = "latency"

    def metrics(self, system, settings):
        return [Metric("p50_us", "us", LOWER), Metric("p99_us", "us", LOWER)]

    def estimate(self, settings):
        return settings.seconds + 2.2  # sockperf warms up and waits before it starts

    def measure(self, system, ctx):
        percentiles = tools.sockperf_ping_pong(system.address("sockperf"), ctx.settings.seconds,
                                              ctx.settings.slack)
        return {"p50_us": percentiles[50.0], "p99_us": percentiles[99.0]}


class ConnRate(Scenario):
    """New TLS connections per second (h2load, one request per connection) routed by SNI,
    and the system's own CPU (user and kernel) per connection."""
    name = "conn_rate"

    def metrics(self, system, settings):
        own = [Metric("cpu_us_per_conn", "us", LOWER)] if system.has_processes else []
        return [Metric("conn_per_s", "conn/s", HIGHER)] + own

    def measure(self, system, ctx):
        address, seconds, slack = system.address("tls"), ctx.settings.seconds, ctx.settings.slack
        count = tools.h2load_requests_for(address, seconds, slack)
        meter = measure.CpuMeter(system.pids())
        values = {"conn_per_s": tools.h2load_connections(address, count, seconds * 4 + slack)}
        if system.has_processes:
            values["cpu_us_per_conn"] = meter.read()[0] * 1e6 / count
        return values


class ConnRateSideBySide(ConnRate):
    """conn_rate with 2 workers (threads), as the connection-rate target reads it: this proxy,
    HAProxy and direct run at once, and h2load visits each in turn, round after round. A drift
    of the machine over minutes, which moved whole repeats by 20-40% on 2 vCPUs, then hits all
    three alike (the repeats of worker_scaling are minutes apart; bench/connrate)."""
    name = "conn_rate_side_by_side"
    together = ("direct", "sniproxy-auto", "haproxy")
    workers = 2


class Concurrency(Scenario):
    """Many idle connections held through the system: memory per connection, and
    bulk throughput while they are held."""
    name = "concurrency"
    # An unfinished HTTP request line: not TLS (so it takes the fallback), and the
    # origin keeps waiting for the rest of it.
    first_flight = b"GET /idle"

    def metrics(self, system, settings):
        rss = [Metric("rss_kib_per_conn", "KiB", LOWER)] if system.has_processes else []
        kernel = [Metric("kernel_relayed_conns", "conns", HIGHER)] if system.has_kernel_relay else []
        return ([Metric("connections", "conns", HIGHER)] + kernel + rss +
                [Metric("sock_mem_kib_per_conn", "KiB", LOWER), Metric("gbps_while_held", "Gbit/s", HIGHER)])

    def estimate(self, settings):
        return settings.seconds + 1.0 + min(3.0, 1.5 * settings.seconds) + settings.idle_connections / 500

    def measure(self, system, ctx):
        # Each repeat runs on a system started fresh (bench/run), so this is RSS before the
        # processes first held idle connections.
        pids = system.pids()
        rss_before = measure.rss_bytes(pids)
        mem_before = measure.socket_memory_bytes()
        with holding_idle(system, ctx, ctx.settings.idle_connections) as (arrived, relayed):
            values = {"connections": float(arrived),
                      "sock_mem_kib_per_conn": (measure.socket_memory_bytes() - mem_before) / 1024 / arrived}
            if system.has_kernel_relay:
                values["kernel_relayed_conns"] = float(relayed)
            if system.has_processes:
                values["rss_kib_per_conn"] = (measure.rss_bytes(pids) - rss_before) / 1024 / arrived
            values["gbps_while_held"] = tools.iperf3(system.address("iperf"), ctx.settings.seconds,
                                                     1, False, ctx.settings.slack).rate
            return values


@contextmanager
def holding_idle(system, ctx, wanted: int):
    """Hold `wanted` idle connections through the system, settled: (how many reached the
    origin, how many of them are kernel-relayed). Closed, and gone at the origin, afterwards."""
    already = procs.established_count(ctx.hold_port)
    established = partial(procs.established_count, ctx.hold_port)
    # Pairs of an earlier scenario may still be finishing; count only the ones held here.
    relayed_before = wait_for_kernel_pairs_to_leave(system, ctx.settings.slack) if system.has_kernel_relay else 0
    held = []
    try:
        held = open_idle_connections(system.address("hold"), wanted, Concurrency.first_flight,
                                     deadline=time.monotonic() + 3 * ctx.settings.slack)
        arrived = wait_for_count(established, already + len(held), stall=ctx.settings.slack) - already
        # /proc/net/tcp read while it changes can list a socket twice: never count more than we opened.
        arrived = min(arrived, len(held))
        if arrived < 0.99 * wanted:
            raise RuntimeError(f"only {arrived} of {wanted} idle connections reached the origin")
        relayed = 0
        if system.has_kernel_relay:
            # Each pair moves to the kernel once quiet for a window (by default), and thousands
            # of registrations take a while: go on once they are done.
            wait_for_count(system.kernel_relayed_connections, relayed_before + arrived,
                           stall=RelayConfig().window + 2.0)
        # Idle means idle for a while: let every system settle into what it holds for an idle
        # connection (the kernel relay's pairs leave their greenlets for the idle sweep after
        # a few quiet seconds).
        time.sleep(min(3.0, 1.5 * ctx.settings.seconds))
        if system.has_kernel_relay:
            relayed = min(system.kernel_relayed_connections() - relayed_before, arrived)
        yield arrived, relayed
    finally:
        for sock in held:
            sock.close()
        wait_for_count(established, already, stall=ctx.settings.slack, falling=True)


def wait_for_kernel_pairs_to_leave(system, timeout: float) -> int:
    """How many pairs are still in the system's SOCK_MAP once none are left, or after timeout."""
    deadline = time.monotonic() + timeout
    while (pairs := system.kernel_relayed_connections()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pairs


def open_idle_connections(address: tuple[str, int], count: int, first_flight: bytes,
                          deadline: float) -> list[socket.socket]:
    held = []
    try:
        while len(held) < count and time.monotonic() < deadline:
            sock = socket.create_connection(address, timeout=5)
            held.append(sock)
            sock.sendall(first_flight)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def wait_for_count(count_now: Callable[[], int], target: int, stall: float, falling: bool = False) -> int:
    """Poll a count (connections, kernel-relayed pairs) until it reaches target. A proxy that
    sets up (or tears down) thousands of connections may take long but keeps moving: give up
    only when the count has not moved toward target for stall seconds (or after 10 x stall)."""
    start = time.monotonic()
    best = count_now()
    best_at = start
    while True:
        count = count_now()
        now = time.monotonic()
        if count <= target if falling else count >= target:
            return count
        if (count < best) if falling else (count > best):
            best, best_at = count, now
        if now - best_at > stall or now - start > 10 * stall:
            return count
        time.sleep(0.1)


class WorkerScaling(Scenario):
    """conn_rate with 1 worker, then (for systems that have workers) with 2.
    Restarts the system, so it runs last."""
    name = "worker_scaling"

    def metrics(self, system, settings):
        counts = (1, 2) if system.has_workers else (1,)
        return [Metric(f"conn_per_s_{n}worker{'s' if n > 1 else ''}", "conn/s", HIGHER) for n in counts]

    def steps(self, system, ctx, repeat):
        steps = []
        for metric, workers in zip(self.metrics(system, ctx.settings), (1, 2)):
            if workers > 1:
                steps.append(Step(f"restart with {workers} workers", 3.0, partial(restart, system, workers)))
            steps.append(Step(f"{workers} worker(s) repeat {repeat + 1}/{ctx.settings.repeats}",
                              self.estimate(ctx.settings), partial(self._rate, system, ctx, metric.name)))
        return steps

    def _rate(self, system, ctx, metric_name):
        return {metric_name: ConnRate().measure(system, ctx)["conn_per_s"]}


def restart(system: System, workers: int) -> dict[str, float]:
    system.stop()
    system.start(workers=workers)
    return {}


class ActiveConnections(TakingTurns):
    """Many active keep-alive TLS connections (h2load --h1 -c 1000) fetching 16 KiB and
    256 KiB objects from the TLS origin: requests/s, p50 and p99, and the system's CPU
    (user and kernel, its own processes) per request."""
    name = "active"

    @staticmethod
    def connections(settings) -> int:
        return min(1000, settings.idle_connections)   # the smoke run: 100

    def metrics(self, system, settings):
        own = [Metric(f"{o}_cpu_us_per_req", "us", LOWER) for o in OBJECTS] if system.has_processes else []
        return [Metric(f"{o}_{m}", unit, better) for o in OBJECTS
                for m, unit, better in (("req_per_s", "req/s", HIGHER), ("p50_ms", "ms", LOWER),
                                        ("p99_ms", "ms", LOWER), ("total_cpu_us_per_req", "us", LOWER))] + own

    # At 20 and 4, a 256 KiB run made 4,000 requests in about 2 s, and one system's p99
    # ranged 71-646 ms over three repeats.
    requests_per_connection = {"16k": 50, "256k": 10}

    def estimate(self, settings):
        return len(OBJECTS) * (2 + self.connections(settings) / 200)

    def measure(self, system, ctx):
        values = {}
        for name in OBJECTS:
            meter = measure.CpuMeter(system.pids())
            connections = self.connections(ctx.settings)
            # Its per-request log is not a *.log: bench/run keeps those with the results.
            result = tools.h2load_keepalive(system.address("tls"), name, connections,
                                            connections * self.requests_per_connection[name],
                                            3 * ctx.settings.slack + connections / 50,
                                            ctx.workdir / f"h2load-{system.name}-{name}.requests")
            own, total = meter.read()   # the handshakes included
            values |= {f"{name}_req_per_s": result.per_s, f"{name}_p50_ms": result.p50_ms,
                       f"{name}_p99_ms": result.p99_ms, f"{name}_total_cpu_us_per_req": total * 1e6 / result.count}
            if system.has_processes:
                values[f"{name}_cpu_us_per_req"] = own * 1e6 / result.count
        return values


class Mixed(Scenario):
    """The loads at once: idle connections held and settled (9,650 in full mode), 100 active
    keep-alive TLS connections fetching 16 KiB objects, and two bulk streams. The active
    ones' requests/s, p50 and p99, and the bulk streams' Gbit/s, with everything else going on."""
    name = "mixed"

    @staticmethod
    def counts(settings) -> tuple[int, int]:
        """(idle, active) connections: full mode 9,650 and 100, the smoke run 50 and 10."""
        return settings.idle_connections - min(200, settings.idle_connections // 2), \
            min(100, settings.idle_connections // 10)

    def metrics(self, system, settings):
        return [Metric("idle_connections", "conns", HIGHER), Metric("req_per_s", "req/s", HIGHER),
                Metric("p50_ms", "ms", LOWER), Metric("p99_ms", "ms", LOWER), Metric("gbps_2streams", "Gbit/s", HIGHER)]

    def estimate(self, settings):
        return 2 * settings.seconds + 2.0 + min(3.0, 1.5 * settings.seconds) + settings.idle_connections / 500

    def measure(self, system, ctx):
        idle, active = self.counts(ctx.settings)
        with holding_idle(system, ctx, idle) as (arrived, _):
            with ThreadPoolExecutor(1) as pool:
                bulk = pool.submit(tools.iperf3, system.address("iperf"), ctx.settings.seconds, 2, False,
                                   ctx.settings.slack)
                result = tools.h2load_keepalive(system.address("tls"), "16k", active, active * 10 * ctx.settings.seconds,
                                                3 * ctx.settings.slack, ctx.workdir / f"h2load-{system.name}-mixed.requests")
                streams = bulk.result()
            return {"idle_connections": float(arrived), "req_per_s": result.per_s, "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms, "gbps_2streams": streams.rate}


SCENARIOS = [Bulk(), TlsDownload(), Latency(), ConnRate(), Concurrency(), ActiveConnections(), Mixed(),
             WorkerScaling(), ConnRateSideBySide()]
