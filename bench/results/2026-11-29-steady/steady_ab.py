# For NOTES.md (run with the project's .venv python: ROUNDS), with steady.patch applied to the
# tree: the default policy, the same with relay.steady_bytes = 65536 (request/response pairs go
# from copy to splice), and the splice relay alone, in interleaved rounds of the active, latency,
# bulk and TLS download loads; medians (bench/ab.py).
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections, Bulk, Latency, TlsDownload  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

ab.run("steadyab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-steady", "steady_bytes = 65536\n"),
    Sniproxy(backends, workdir, "splice")], [ActiveConnections(), Latency(), Bulk(), TlsDownload()],
    idle_connections=1000)
