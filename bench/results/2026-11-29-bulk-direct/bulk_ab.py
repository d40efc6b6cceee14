# For NOTES.md (run with the project's .venv python: ROUNDS). The bench's bulk load (iperf3, one
# and four streams, both directions) direct, through auto and through HAProxy with splice, one
# worker (thread) each, in interleaved rounds; medians, then each round's values.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy, System  # noqa: E402

ab.print_rounds(ab.run("bulk-direct-", lambda backends, workdir: [
    System(backends, workdir), Sniproxy(backends, workdir, "auto"), HaproxySplice(backends, workdir, 100)],
    [Bulk()], idle_connections=0))
