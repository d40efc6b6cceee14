# For NOTES.md (run with the project's .venv python: ROUNDS [SYSTEMS]). The bench's 64-byte
# ping-pong (sockperf) direct, through auto, the kernel relay alone and copy alone, nginx and
# HAProxy with splice (or the systems named, comma-separated), one worker (thread) each, in
# interleaved rounds; medians, then each round's values.
import sys
from dataclasses import replace
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab, measure, origins, procs  # noqa: E402
from bench.scenarios import MODES, Context, Latency  # noqa: E402
from bench.systems import HaproxySplice, Nginx, Sniproxy, System  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
settings = replace(MODES["full"], idle_connections=0)
with origins.running("latency-", download_bytes=1 << 20, nofile=procs.raise_fd_limit()) as (workdir, backends):
    systems = [System(backends, workdir),
               *(Sniproxy(backends, workdir, policy) for policy in ("auto", "kernel", "copy")),
               Nginx(backends, workdir, 100), HaproxySplice(backends, workdir, 100)]
    if len(sys.argv) > 2:
        systems = [s for s in systems if s.name in sys.argv[2].split(",")]
    values = ab.measure_rounds(systems, [Latency()], Context(settings, workdir, backends.hold), rounds)
print("\n".join(measure.machine()))
ab.print_medians(values)
for (name, metric), vs in values.items():
    print(f"{metric:40s} {name:28s} each round: {', '.join(f'{v:.0f}' for v in vs)}")
