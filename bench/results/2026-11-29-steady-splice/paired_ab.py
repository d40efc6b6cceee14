# For NOTES.md (run with the project's .venv python: ROUNDS): the active loads alone, the default
# policy against relay.steady_bytes = 0, each round's values printed as well as the medians, so
# that the two can be compared round by round (bench/ab.py).
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

ab.print_rounds(ab.run("steadypaired-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-steady0", "steady_bytes = 0\n")],
    [ActiveConnections()], idle_connections=1000))
