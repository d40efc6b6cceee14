# For NOTES.md (run with the project's .venv python: ROUNDS). The bench's bulk load (iperf3, one
# and four streams, both directions) direct, through auto and through HAProxy with splice, one
# worker (thread) each, in interleaved rounds; medians, then each round's values.
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab, measure, origins, procs  # noqa: E402
from bench.scenarios import MODES, Bulk, Context  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy, System  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
settings = replace(MODES["full"], idle_connections=0)
with origins.running("bulk-direct-", download_bytes=1 << 20, nofile=procs.raise_fd_limit()) as (workdir, backends):
    systems = [System(backends, workdir), Sniproxy(backends, workdir, "auto"), HaproxySplice(backends, workdir, 100)]
    values = ab.measure_rounds(systems, [Bulk()], Context(settings, workdir, backends.hold), rounds)
print("\n".join(measure.machine()))
ab.print_medians(values)
for (name, metric), vs in values.items():
    print(f"{metric:40s} {name:28s} each round: {', '.join(f'{v:.3g}' for v in vs)}")
