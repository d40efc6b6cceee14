# For ANALYSIS.md (run with the project's .venv python: ROUNDS). The TLS download alone, in
# interleaved rounds: the default policy; the same with relay.splice_rate out of reach, so that
# a fast TLS pair stays in the copy relay's C pairs instead of moving to splice (as
# relay.tls_fast_relay sends it); copy alone; splice alone; HAProxy with splice. Every round
# printed.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

ab.print_rounds(ab.run("tlsab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-tls-stays", "splice_rate = 1000000000000000\n"),
    Sniproxy(backends, workdir, "copy"), Sniproxy(backends, workdir, "splice"),
    HaproxySplice(backends, workdir, 200)], [TlsDownload()], idle_connections=100))
