# For ANALYSIS.md (run with the project's .venv python: ROUNDS). The keep-alive loads alone, in
# interleaved rounds: the default policy, copy alone and HAProxy with splice. Every round printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

ab.print_rounds(ab.run("activeab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"), Sniproxy(backends, workdir, "copy"),
    HaproxySplice(backends, workdir, 2000)], [ActiveConnections()], idle_connections=1000))
