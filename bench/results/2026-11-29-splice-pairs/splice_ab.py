# For NOTES.md (run with the project's .venv python: ROUNDS BEFORE_TREE). The splice relay's
# pairs in C against the Python ones they replace: splice alone and the default policy, from
# this checkout and from BEFORE_TREE (a checkout of the commit before, built), with HAProxy
# with splice, over the TLS download and the bulk streams in interleaved rounds. Every round
# printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

before = Path(sys.argv[2])
ab.print_rounds(ab.run("spliceab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "splice"), Sniproxy(backends, workdir, "splice", ("before", before)),
    Sniproxy(backends, workdir, "auto"), Sniproxy(backends, workdir, "auto", ("before", before)),
    HaproxySplice(backends, workdir, 200)], [TlsDownload(), Bulk()], idle_connections=100))
