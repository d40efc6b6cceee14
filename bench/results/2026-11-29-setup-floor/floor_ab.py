# For NOTES.md (run with the project's .venv python: ROUNDS). The floor of a Python setup path
# (../2026-11-29-connrate-floor/floor.py) with its Python pairs and with the proxy's C pairs (its
# mode "c"), beside this proxy (one worker, relay.policy = "auto") and HAProxy (one thread), in
# bench/connrate's interleaved rounds: h2load opens one TLS connection per request through each.
import importlib.util
import sys
from pathlib import Path
FLOOR = Path(__file__).resolve().parent.parent / "2026-11-29-connrate-floor"
spec = importlib.util.spec_from_file_location("floor_ab", FLOOR / "floor_ab.py")
floor_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(floor_ab)   # its Floor and run
from bench.systems import Haproxy, Sniproxy  # noqa: E402

floor_ab.run(lambda backends, workdir: [
    floor_ab.Floor(backends, workdir, "floor-python-pairs"), floor_ab.Floor(backends, workdir, "floor-c-pairs", "c"),
    Sniproxy(backends, workdir, "auto"), Haproxy(backends, workdir, 4096)], int(sys.argv[1]), "haproxy")
