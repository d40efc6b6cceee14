# For NOTES.md (run with the project's .venv python). TCP segments and the machine's context
# switches per connection, through this proxy (two workers, relay.policy = "auto") and HAProxy (two
# threads), under h2load's connection load (6,000 TLS connections, 16 at a time), three rounds
# each in turn: `nstat -az` and /proc/stat before and after each run, divided by the connections.
import subprocess
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import measure, origins, tools  # noqa: E402
from bench.systems import Haproxy, Sniproxy  # noqa: E402

CONNECTIONS = 6000
SHOWN = ("TcpInSegs", "TcpOutSegs", "TcpOutRsts", "TcpExtTCPPureAcks", "TcpExtTCPDeferAcceptDrop", "TcpExtTW")


def nstat() -> dict[str, int]:
    out = subprocess.run(["nstat", "-az"], capture_output=True, text=True, check=True).stdout
    return {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines()[1:]) if len(p) >= 2 and p[1].isdigit()}


print("\n".join(measure.machine()))
with origins.running("segments-") as (workdir, backends):
    systems = [Sniproxy(backends, workdir, "auto"), Haproxy(backends, workdir, 4096)]
    for system in systems:
        system.start(2)
    try:
        for number in range(1, 4):
            for system in measure.in_turn(systems, number):
                before, switches = nstat(), measure.context_switches()
                rate = tools.h2load_connections(system.address("tls"), CONNECTIONS, 60)
                after, switches = nstat(), measure.context_switches() - switches
                per = {k: (after.get(k, 0) - before.get(k, 0)) / CONNECTIONS for k in SHOWN}
                print(f"round {number} {system.name}: {rate:,.0f} conn/s; per connection: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
                      + f", context switches {switches / CONNECTIONS:.1f}", flush=True)
    finally:
        for system in systems:
            system.stop()
