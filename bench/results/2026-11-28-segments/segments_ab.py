# A/B for NOTES.md (run with the project's .venv python: ROUNDS). The default policy, whose fast
# pairs in small segments went to splice (relay.kernel_segment: 0.5 at 3ddeee5, 0.8 at 03526c4),
# against the same with kernel_segment = 0 (every fast pair to the kernel), beside HAProxy with
# splice, on the bench's TLS download, bulk and mixed loads, in interleaved rounds; medians
# [range]. The key is gone since: run it with sniproxy/ of one of those revisions.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, Mixed, TlsDownload  # noqa: E402

ab.compare_auto("segab-", [("sniproxy-auto-segment0", 'kernel_segment = 0\n')], [TlsDownload(), Bulk(), Mixed()])
