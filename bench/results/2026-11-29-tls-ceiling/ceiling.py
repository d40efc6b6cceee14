# For NOTES.md (run with the project's .venv python: ROUNDS). The bench's TLS download direct,
# through each relay of this proxy (auto at the default mark, 1 MiB, and at the earlier 256 KiB),
# and through HAProxy with splice, one worker (thread) each, in interleaved rounds; medians.
# run-15-rounds.txt was made when the default was 256 KiB: its sniproxy-auto is this script's
# sniproxy-auto-mark256k, and its sniproxy-auto-mark1m is today's sniproxy-auto.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy, System  # noqa: E402

ab.run("ceiling-", lambda backends, workdir: [
    System(backends, workdir),
    *(Sniproxy(backends, workdir, policy) for policy in ("auto", "kernel", "splice", "copy")),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-mark256k", "", "batch_bytes = 262144\n"),
    HaproxySplice(backends, workdir, 100)], [TlsDownload()], idle_connections=0)
