# For NOTES.md (run with the project's .venv python: ROUNDS TREE): the active loads (1,000
# keep-alive TLS connections, 16 KiB and 256 KiB objects), in interleaved rounds, through this
# checkout (the copy relay's pairs in C), through the package in TREE/sniproxy (e1fdea6's, the
# pairs in Python), both under the default policy, and HAProxy with splice; every round printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

tree = Path(sys.argv.pop(2)).resolve()
ab.print_rounds(ab.run("copypairactive-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    Sniproxy(backends, workdir, "auto", (tree.name, tree)),
    HaproxySplice(backends, workdir, 1100)], [ActiveConnections()], idle_connections=1000))
