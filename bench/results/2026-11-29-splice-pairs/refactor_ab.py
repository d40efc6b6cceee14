# For NOTES.md (run with the project's .venv python: ROUNDS BEFORE_TREE). The TLS download alone,
# splice and the default policy, each from BEFORE_TREE (built) first and this checkout after it,
# in interleaved rounds. Every round printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import TlsDownload  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

before = Path(sys.argv[2])
ab.print_rounds(ab.run("tlsref-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "splice", ("before", before)), Sniproxy(backends, workdir, "splice"),
    Sniproxy(backends, workdir, "auto", ("before", before)), Sniproxy(backends, workdir, "auto")],
    [TlsDownload()], idle_connections=100))
