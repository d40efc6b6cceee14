# For NOTES.md (run with the project's .venv python: ROUNDS). Two workers each: bpf.steering_backlog
# at 4 (the default until 2026-11-29) and at 64, beside HAProxy with two threads, in interleaved
# rounds of the bench's loads with long-lived connections (1,000 active keep-alive ones; the mixed
# load of idle, active and bulk ones), where how the first worker's share spills matters; medians.
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import ab  # noqa: E402
from bench.scenarios import ActiveConnections, Mixed  # noqa: E402
from bench.systems import Haproxy  # noqa: E402

IDLE = 2000
values = ab.run("backlogab-", lambda backends, workdir: [
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-backlog4", "", "steering_backlog = 4\n"),
    ab.Variant(backends, workdir, "auto", "sniproxy-auto-backlog64", "", "steering_backlog = 64\n"),
    Haproxy(backends, workdir, IDLE + 100)], [ActiveConnections(), Mixed()], idle_connections=IDLE, workers=2)
ab.print_rounds(values)
