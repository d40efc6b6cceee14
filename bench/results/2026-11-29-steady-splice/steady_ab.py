# For NOTES.md (run with the project's .venv python: ROUNDS): the default policy, which sends
# steady request/response pairs from copy to splice and judges them on there
# (relay.steady_bytes = 64 KiB), beside the same with steady_bytes = 0 (they stay in copy, the
# policy before) and HAProxy with splice, in interleaved rounds of the active, bulk, TLS download
# and mixed loads; medians (bench/ab.py).
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections, Bulk, Mixed, TlsDownload  # noqa: E402

ab.compare_auto("steadysplice-", [("sniproxy-auto-steady0", "steady_bytes = 0\n")],
                [ActiveConnections(), Bulk(), TlsDownload(), Mixed()])
