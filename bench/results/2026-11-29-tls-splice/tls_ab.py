# A/B for NOTES.md (run with the project's .venv python: ROUNDS [SCENARIOS]). The default policy,
# whose fast TLS pairs go to the kernel (relay.tls_fast_relay), against the same with
# tls_fast_relay = "splice", beside HAProxy with splice, in interleaved rounds of the bench's TLS
# download, bulk and mixed loads (or those named); medians. The runs beside this file were made
# while splice was the default: their sniproxy-auto is this script's sniproxy-auto-tlssplice,
# and their sniproxy-auto-tlskernel is today's sniproxy-auto.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, Mixed, TlsDownload  # noqa: E402

wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else None
scenarios = [s for s in (TlsDownload(), Bulk(), Mixed()) if wanted is None or s.name in wanted]
ab.compare_auto("tlsab-", [("sniproxy-auto-tlssplice", 'tls_fast_relay = "splice"\n')], scenarios)
