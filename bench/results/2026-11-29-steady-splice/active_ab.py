# For NOTES.md (run with the project's .venv python: ROUNDS): the active loads alone, in
# interleaved rounds: the default policy (steady pairs to splice), the same with
# relay.steady_bytes = 0 (they stay in copy), the splice relay alone and HAProxy with splice;
# medians (bench/ab.py). Full9 had the default behind copy alone at 256 KiB, in sequential runs.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

ab.run("steadyactive-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-steady0", "steady_bytes = 0\n"),
    Sniproxy(backends, workdir, "splice"),
    HaproxySplice(backends, workdir, 2100)], [ActiveConnections()], idle_connections=1000)
