# For NOTES.md (run with the project's .venv python): where the machine's CPU goes per new TLS
# connection (h2load --h1 -c 16, one request each) with no proxy, through this proxy's copy relay
# (1 worker) and through HAProxy (1 thread), in interleaved rounds: h2load (its rusage), the nginx
# origin and the proxy (/proc/<pid>/stat), the rest (kworkers, softirq in idle time), and TCP
# segments and resets per connection (nstat). Medians.
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import measure, origins, procs, tools  # noqa: E402
from bench.scenarios import MODES  # noqa: E402
from bench.systems import Haproxy, Sniproxy, System  # noqa: E402

COUNT, ROUNDS = 6000, int(sys.argv[1]) if len(sys.argv) > 1 else 3
TICK = os.sysconf("SC_CLK_TCK")
SEGMENTS = ("TcpOutSegs", "TcpOutRsts")
hard = procs.raise_fd_limit()


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def busy_s() -> float:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def tcp_counts() -> dict[str, int]:
    out = json.loads(subprocess.run(["nstat", "-az", "--json"], capture_output=True, text=True).stdout)
    return {k: v for table in out.values() for k, v in table.items() if k in SEGMENTS}


def children_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


with origins.running("split-", download_bytes=MODES["full"].download_bytes, nofile=hard) as (workdir, backends):
    systems = [System(backends, workdir), Sniproxy(backends, workdir, "copy"), Haproxy(backends, workdir, 300)]
    for system in systems:
        system.start(1)
    rows: dict[tuple[str, str], list[float]] = {}
    try:
        nginx = [int(p) for p in subprocess.run(["pgrep", "-x", "nginx"], capture_output=True,
                                                text=True).stdout.split()]
        for _ in range(ROUNDS):
            for system in systems:
                own = system.pids()
                before = (children_s(), busy_s(), cpu_s(nginx), cpu_s(own), tcp_counts())
                rate = tools.h2load_connections(system.address("tls"), COUNT, 120)
                after = (children_s(), busy_s(), cpu_s(nginx), cpu_s(own), tcp_counts())
                us = [(b - a) / COUNT * 1e6 for a, b in zip(before[:4], after[:4])]
                row = {"conn/s": rate, "machine": us[1], "h2load": us[0], "nginx": us[2], "proxy": us[3]}
                row["rest"] = row["machine"] - row["h2load"] - row["nginx"] - row["proxy"]
                row.update({k: (after[4][k] - before[4][k]) / COUNT for k in SEGMENTS})
                for name, value in row.items():
                    rows.setdefault((system.name, name), []).append(value)
    finally:
        for system in systems:
            system.stop()
print("\n".join(measure.machine()))
print(f"{COUNT} connections a run, {ROUNDS} rounds; CPU in us per connection, segments per connection; medians")
columns = ("conn/s", "machine", "h2load", "nginx", "proxy", "rest") + SEGMENTS
print(f"{'system':16s}" + "".join(f"{c:>12s}" for c in columns))
for system in systems:
    print(f"{system.name:16s}" + "".join(f"{statistics.median(rows[(system.name, c)]):12.1f}" for c in columns))
