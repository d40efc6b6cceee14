# A/B for NOTES.md (run with the project's .venv python: ROUNDS [SCENARIOS]). The default
# policy, whose fast kernel-relayed pairs in small skbs batch their verdict (bpf.batch_bytes),
# against the same with bpf.batch_bytes = 0, beside HAProxy with splice, in interleaved rounds of
# the bench's TLS download, bulk and mixed loads (or those named, e.g. tls_download); medians.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, Mixed, TlsDownload  # noqa: E402

wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else None
scenarios = [s for s in (TlsDownload(), Bulk(), Mixed()) if wanted is None or s.name in wanted]
ab.compare_auto("batchab-", [("sniproxy-auto-batch0", "", "batch_bytes = 0\n")], scenarios)
