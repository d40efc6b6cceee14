# A/B for NOTES.md (run with the project's .venv python: ROUNDS [SCENARIOS]). The low-water mark
# of batched pairs (bpf.batch_bytes) at 256 KiB, 512 KiB and 1 MiB, beside HAProxy with splice, in
# interleaved rounds of the bench's TLS download (or the loads named); medians. The runs beside
# this file were made when the default was 256 KiB: their sniproxy-auto is this one's mark256k,
# and their mark1m is today's default, sniproxy-auto.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, Mixed, TlsDownload  # noqa: E402

wanted = (sys.argv[2] if len(sys.argv) > 2 else "tls_download").split(",")
scenarios = [s for s in (TlsDownload(), Bulk(), Mixed()) if s.name in wanted]
ab.compare_auto("markab-", [("sniproxy-auto-mark256k", "", "batch_bytes = 262144\n"),
                            ("sniproxy-auto-mark512k", "", "batch_bytes = 524288\n")], scenarios)
