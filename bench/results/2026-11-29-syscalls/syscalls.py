# For NOTES.md (run with the project's .venv python: [POLICY] [CONNECTIONS]): the system calls a
# connection costs this proxy (one worker, relay.policy POLICY, auto by default) and HAProxy (one
# thread), counted exactly by `strace -c -f` on their processes while h2load opens CONNECTIONS
# (2,000 by default) TLS connections through each, one request per connection. strace slows both,
# so this counts calls; it does not time them.
import re
import subprocess
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import measure, origins, tools  # noqa: E402
from bench.systems import Haproxy, Sniproxy  # noqa: E402

policy = sys.argv[1] if len(sys.argv) > 1 else "auto"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def counted(system) -> dict[str, int]:
    """Calls by name over `count` connections through system, from strace's summary."""
    pids = [str(p) for p in system.pids()]
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", "/dev/stderr", *sum((["-p", p] for p in pids), [])],
                              stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)   # attached
    tools.h2load_connections(system.address("tls"), count, 120.0)
    tracer.send_signal(2)
    summary = tracer.communicate(timeout=30)[1]
    calls = {}
    for line in summary.splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


print("\n".join(measure.machine()))
with origins.running("sniproxy-syscalls-") as (workdir, backends):
    systems = [Sniproxy(backends, workdir, policy), Haproxy(backends, workdir, 4096)]
    results = {}
    try:
        for system in systems:
            system.start(1)
        for system in systems:
            results[system.name] = counted(system)
    finally:
        for system in systems:
            system.stop()
names = sorted(set().union(*results.values()), key=lambda n: -max(r.get(n, 0) for r in results.values()))
print(f"system calls per connection, {count} TLS connections (h2load, one request each), one worker/thread")
print(f"{'call':20s}" + "".join(f"{name:>20s}" for name in results))
for call in names:
    print(f"{call:20s}" + "".join(f"{r.get(call, 0) / count:20.2f}" for r in results.values()))
print(f"{'total':20s}" + "".join(f"{sum(r.values()) / count:20.2f}" for r in results.values()))
