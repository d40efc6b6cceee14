# A/B for NOTES.md (run with the project's .venv python: ROUNDS [SCENARIOS|all [MARGINS]]). Two workers each: the
# default (bpf.steering = "fill": bpf/steer.c sends a new connection to the lowest worker that keeps
# up) against the kernel's SO_REUSEPORT hash (steering = "hash"), beside HAProxy with two threads, in
# interleaved rounds of the bench's connection rate, active and mixed loads (or those named); medians.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections, ConnRate, Mixed  # noqa: E402
from bench.systems import Haproxy, Sniproxy  # noqa: E402

IDLE = 2000
wanted = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] != "all" else None
MARGINS = [int(m) for m in sys.argv[3].split(",")] if len(sys.argv) > 3 else []   # more bpf.steering_margin variants
scenarios = [s for s in (ConnRate(), ActiveConnections(), Mixed()) if wanted is None or s.name in wanted]
values = ab.run("steerab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "auto"),
    *(ab.Variant(backends, workdir, "auto", f"sniproxy-auto-margin{m}", "", f"steering_margin = {m}\n")
      for m in MARGINS),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-hash", "", 'steering = "hash"\n'),
    Haproxy(backends, workdir, IDLE + 100)], scenarios, idle_connections=IDLE, workers=2)
ab.print_rounds(values)
