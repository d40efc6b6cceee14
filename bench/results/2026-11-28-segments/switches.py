# For NOTES.md (run with the project's .venv python, as root, with perf): context switches by
# process name (perf's sched:sched_switch, system-wide) during one TLS download of the bench
# through each system, and the download's MB/s.
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import origins, procs  # noqa: E402
from bench.scenarios import MODES, Context, TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

hard = procs.raise_fd_limit()
settings = replace(MODES["full"], idle_connections=200)
policies = sys.argv[1].split(",") if len(sys.argv) > 1 else ["auto", "splice", "copy"]

with origins.running("switches-", download_bytes=settings.download_bytes, nofile=hard) as (workdir, backends):
    systems = [Sniproxy(backends, workdir, policy) for policy in policies] + [HaproxySplice(backends, workdir, 300)]
    ctx = Context(settings, workdir, backends.hold)
    for system in systems:
        system.start(1)
    try:
        for system in systems:
            data = workdir / f"{system.name}.perf"
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "sched:sched_switch", "-a", "-o", str(data)],
                                    stderr=subprocess.DEVNULL)
            time.sleep(1)
            rate = TlsDownload().measure(system, ctx)["mb_per_s"]
            perf.send_signal(2)
            perf.wait()
            names = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm"], capture_output=True,
                                   text=True).stdout.split("\n")
            counts = Counter(name.strip().split("/")[0].split("-")[0] for name in names if name.strip())
            top = ", ".join(f"{name} {n}" for name, n in counts.most_common(4))
            print(f"{system.name:20s} {rate:6.0f} MB/s  switches {sum(counts.values()):6d}: {top}", flush=True)
    finally:
        for system in systems:
            system.stop()
