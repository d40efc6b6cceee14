"""A/B runs for the scripts beside bench/results' notes: systems started together, and every
one measured in each round in turn, so that the machine's drift hits them alike."""
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable

from bench import measure, origins, procs
from bench.origins import Origins
from bench.scenarios import MODES, Context, Scenario
from bench.systems import HaproxySplice, Sniproxy, System


class Variant(Sniproxy):
    """This proxy under relay.policy with more [relay] (and [bpf]) lines, under a name of its own."""

    def __init__(self, origins, workdir, policy: str, name: str, relay_lines: str, bpf_lines: str = ""):
        super().__init__(origins, workdir, policy)
        self.name, self.relay_lines, self.bpf_lines = name, relay_lines, bpf_lines

    def config(self, workers: int) -> str:
        line = f'policy = "{self.policy}"\n'
        return super().config(workers).replace(line, line + self.relay_lines).replace("[bpf]\n",
                                                                                        "[bpf]\n" + self.bpf_lines)


def measure_rounds(systems: list[System], scenarios: list[Scenario], ctx: Context,
                   rounds: int, workers: int = 1) -> dict[tuple[str, str], list[float]]:
    """(system name, "scenario metric") -> its value in each round."""
    values: dict[tuple[str, str], list[float]] = {}
    for system in systems:
        system.start(workers)
    try:
        for r in range(rounds):
            order = measure.in_turn(systems, r + 1)
            for scenario in scenarios:   # an uncounted first turn, as bench/run takes (Scenario.warm_up)
                if scenario.warm_up:
                    scenario.measure(order[0], ctx)
            for system in order:
                for scenario in scenarios:
                    for metric, value in scenario.measure(system, ctx).items():
                        values.setdefault((system.name, f"{scenario.name} {metric}"), []).append(value)
                print(f"[round {r + 1}/{rounds}] {system.name}", file=sys.stderr, flush=True)
    finally:
        for system in systems:
            system.stop()
    return values


def print_medians(values: dict[tuple[str, str], list[float]]) -> None:
    """A line per metric and system: the median, and the range."""
    for (name, metric), vs in sorted(values.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{metric:40s} {name:28s} {statistics.median(vs):12.4g} [{min(vs):.4g}-{max(vs):.4g}]")


def print_rounds(values: dict[tuple[str, str], list[float]]) -> None:
    """A line per metric and system: its value in each round, in order."""
    for (name, metric), vs in values.items():
        print(f"{metric:40s} {name:28s} each round: {', '.join(f'{v:.4g}' for v in vs)}")


def run(prefix: str, systems_of: Callable[[Origins, Path], list[System]], scenarios: list[Scenario],
        idle_connections: int = 2000, workers: int = 1) -> dict[tuple[str, str], list[float]]:
    """The systems that systems_of(backends, workdir) makes, with `workers` workers (threads) each, over ROUNDS
    (the first argument, 3 by default) of the scenarios in full mode with idle_connections
    held; prints the machine, then the medians, and returns every round's values."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    hard = procs.raise_fd_limit()
    settings = replace(MODES["full"], idle_connections=idle_connections)
    with origins.running(prefix, download_bytes=settings.download_bytes, nofile=hard) as (workdir, backends):
        values = measure_rounds(systems_of(backends, workdir), scenarios, Context(settings, workdir, backends.hold),
                                rounds, workers)
    print("\n".join(measure.machine()))
    print_medians(values)
    return values


def compare_auto(prefix: str, variants: list[tuple[str, ...]], scenarios: list[Scenario]) -> None:
    """The default policy, each variant ((name, [relay] lines[, [bpf] lines])) of it and HAProxy with splice,
    through run(), with 2,000 idle connections."""
    idle = 2000
    run(prefix, lambda backends, workdir: [
        Sniproxy(backends, workdir, "auto"),
        *(Variant(backends, workdir, "auto", *variant) for variant in variants),
        HaproxySplice(backends, workdir, idle + 100)], scenarios, idle_connections=idle)
