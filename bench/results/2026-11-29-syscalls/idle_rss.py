# For NOTES.md (run with the project's .venv python: ROUNDS TREE): the bench's idle load
# (bench/scenarios.py Concurrency: 9,850 idle connections held, RSS per connection) through this
# checkout and through the package in TREE/sniproxy (12cf741's, before the trim changed), default
# policy, one worker, each started fresh for every measurement as bench/run does, in turns.
import statistics
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import measure, origins, procs  # noqa: E402
from bench.scenarios import MODES, Concurrency, Context  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

rounds, tree = int(sys.argv[1]), Path(sys.argv[2]).resolve()
hard = procs.raise_fd_limit()
settings = replace(MODES["full"], idle_connections=9850)
values: dict[str, list[float]] = {}
with origins.running("idlerss-", download_bytes=settings.download_bytes, nofile=hard) as (workdir, backends):
    ctx = Context(settings, workdir, backends.hold)
    systems = [Sniproxy(backends, workdir, "auto"), Sniproxy(backends, workdir, "auto", (tree.name, tree))]
    for r in range(rounds):
        for system in systems:
            system.start(1)
            try:
                got = Concurrency().measure(system, ctx)
            finally:
                system.stop()
            values.setdefault(system.name, []).append(got["rss_kib_per_conn"])
            print(f"[round {r + 1}/{rounds}] {system.name}: {got['rss_kib_per_conn']:.2f} KiB, "
                  f"{got['connections']:.0f} held", file=sys.stderr, flush=True)
print("\n".join(measure.machine()))
for name, vs in values.items():
    print(f"{name:32s} rss KiB per idle connection: median {statistics.median(vs):.2f} "
          f"[{min(vs):.2f}-{max(vs):.2f}], each round: {', '.join(f'{v:.2f}' for v in vs)}")
