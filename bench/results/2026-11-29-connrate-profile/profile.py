# For NOTES.md (run with the project's .venv python: POLICY [CONNECTIONS [native]]; native: with C
# frames, py-spy --native, as ../2026-11-29-copypair/ ran it). One worker of this
# proxy under h2load's new-connection load (one request per connection, 16 at a time), sampled
# by py-spy at 500 Hz for 8 s; prints the rate and the share of samples by function, own and
# inclusive (the project's functions only for the latter).
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from bench import measure, origins, tools  # noqa: E402
from bench.systems import REPO, Sniproxy  # noqa: E402

policy = sys.argv[1] if len(sys.argv) > 1 else "auto"
count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
native = ["--native"] if sys.argv[3:] == ["native"] else []
raw = Path(tempfile.mkdtemp(prefix="connrate-profile-")) / "samples.txt"
with origins.running("connrate-profile-") as (workdir, backends):
    proxy = Sniproxy(backends, workdir, policy)
    proxy.start(1)
    try:
        worker = max(proxy.pids())   # forked after the master
        spy = subprocess.Popen([str(REPO / ".venv/bin/py-spy"), "record", "-r", "500", "-d", "8", "-f", "raw",
                                "-o", str(raw), "-p", str(worker), *native],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        rate = tools.h2load_connections(proxy.address("tls"), count, 60)
        spy.wait()
    finally:
        proxy.stop()
own, inclusive, total = collections.Counter(), collections.Counter(), 0
for line in raw.read_text().splitlines():
    stack, _, n = line.rpartition(" ")
    frames = stack.split(";")
    total += int(n)
    own[frames[-1]] += int(n)
    for frame in set(frames):
        inclusive[frame] += int(n)
print("\n".join(measure.machine()))
print(f"relay.policy = {policy}: {rate:,.0f} conn/s; {total} samples of the worker")
print("own:")
for frame, n in own.most_common(15):
    print(f"  {100 * n / total:5.1f}% {frame}")
print("inclusive:")
for frame, n in inclusive.most_common():
    if "sniproxy/" in frame and 100 * n / total >= 2:
        print(f"  {100 * n / total:5.1f}% {frame}")
