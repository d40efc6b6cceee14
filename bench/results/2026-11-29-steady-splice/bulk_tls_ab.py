# For NOTES.md (run with the project's .venv python: ROUNDS): the default policy beside the same
# with relay.steady_bytes = 0, on the bulk and TLS download loads alone, in interleaved rounds;
# medians (bench/ab.py). The loads where steady_ab.py saw the default behind, within its ranges.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, TlsDownload  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

ab.run("steadybulk-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-steady0", "steady_bytes = 0\n")],
    [Bulk(), TlsDownload()], idle_connections=100)
