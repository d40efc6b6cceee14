# Scratch A/B for NOTES.md (run with the project's .venv python: ROUNDS). The default policy with
# relay.fast_relay = "kernel" (its default) and "splice", beside HAProxy with splice, on the bulk,
# TLS download and mixed loads, in interleaved rounds; medians.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import Bulk, Mixed, TlsDownload  # noqa: E402

ab.compare_auto("fastab-", [("sniproxy-auto-fastsplice", 'fast_relay = "splice"\n')], [Bulk(), TlsDownload(), Mixed()])
