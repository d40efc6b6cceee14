# Scratch measurement for NOTES.md (run with the project's .venv python). TLS download: curl's reads and CPU per GB under each system, perf stat, interleaved rounds
import sys, subprocess, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import origins, tools, measure
from bench.systems import Sniproxy, System
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
results = {}
with origins.running("tlsdl-", download_bytes=1 << 30) as (workdir, backends):
    systems = [System(backends, workdir), *(Sniproxy(backends, workdir, p) for p in ("copy", "kernel", "splice", "auto"))]
    try:
        for s in systems:
            s.start(2)
        for r in range(rounds):
            for s in systems:
                host, port = s.address("tls")
                cmd = ["perf", "stat", "-x", ",", "-e", "task-clock,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,context-switches",
                       "curl", "-sS", "-k", "-o", "/dev/null", "--max-time", "60", "--resolve", f"{tools.SNI_NAME}:{port}:{host}",
                       "-w", "%{size_download} %{speed_download}", f"https://{tools.SNI_NAME}:{port}/{tools.BIG_FILE}"]
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
                nbytes, speed = p.stdout.split()
                stat = {}
                for line in p.stderr.splitlines():
                    f = line.split(",")
                    if len(f) > 3 and f[0].replace(".", "").isdigit():
                        stat[f[2]] = float(f[0])
                gb = int(nbytes) / 1e9
                row = {"MB/s": float(speed) / 1e6, "curl_cpu_s_per_gb": stat["task-clock"] / 1e3 / gb,
                       "reads_per_gb": (stat.get("syscalls:sys_enter_read", 0) + stat.get("syscalls:sys_enter_recvfrom", 0)) / gb,
                       "bytes_per_read": int(nbytes) / max(stat.get("syscalls:sys_enter_read", 0) + stat.get("syscalls:sys_enter_recvfrom", 0), 1),
                       "curl_cs_per_gb": stat["context-switches"] / gb}
                results.setdefault(s.name, []).append(row)
                print(r, s.name, {k: round(v, 3) for k, v in row.items()}, file=sys.stderr, flush=True)
    finally:
        for s in systems:
            s.stop()
print("\n".join(measure.machine()))
print(f"{'system':18s} " + " ".join(f"{k:>18s}" for k in results["direct"][0]))
for name, rows in results.items():
    print(f"{name:18s} " + " ".join(f"{statistics.median(r[k] for r in rows):18.3f}" for k in rows[0]))
