# For NOTES.md (run with the project's .venv python: ROUNDS [SYSTEMS]). The bench's 64-byte
# ping-pong (sockperf) direct, through auto, the kernel relay alone and copy alone, nginx and
# HAProxy with splice (or the systems named, comma-separated), one worker (thread) each, in
# interleaved rounds; medians, then each round's values.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Latency  # noqa: E402
from bench.systems import HaproxySplice, Nginx, Sniproxy, System  # noqa: E402


def systems(backends, workdir):
    made = [System(backends, workdir),
            *(Sniproxy(backends, workdir, policy) for policy in ("auto", "kernel", "copy")),
            Nginx(backends, workdir, 100), HaproxySplice(backends, workdir, 100)]
    return [s for s in made if len(sys.argv) < 3 or s.name in sys.argv[2].split(",")]


ab.print_rounds(ab.run("latency-", systems, [Latency()], idle_connections=0))
