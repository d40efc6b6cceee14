# For NOTES.md (run with the project's .venv python: ROUNDS TREE...). The 1,000 keep-alive
# connections alone, in interleaved rounds: the default policy of this checkout, the same from
# each TREE given (a build of this checkout with another read size), and HAProxy with and
# without splice. Every round printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections  # noqa: E402
from bench.systems import Haproxy, HaproxySplice, Sniproxy  # noqa: E402

trees = [Path(t) for t in sys.argv[2:]]
ab.print_rounds(ab.run("fairab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    *(Sniproxy(backends, workdir, "auto", (t.name, t)) for t in trees),
    Haproxy(backends, workdir, 2000), HaproxySplice(backends, workdir, 2000)],
    [ActiveConnections()], idle_connections=1000))
