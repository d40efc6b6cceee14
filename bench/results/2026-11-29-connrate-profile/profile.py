# For NOTES.md (run with the project's .venv python: POLICY [CONNECTIONS [native]]; native: with C
# frames, py-spy --native, as ../2026-11-29-copypair/ ran it). One worker of this
# proxy under h2load's new-connection load (one request per connection, 16 at a time), sampled
# by py-spy at 500 Hz for 8 s; prints the rate and the share of samples by function, own and
# inclusive (the project's functions only for the latter). With native, it also splits the busy
# samples into system calls and user space, and user space by the deepest project function
# (../2026-11-29-setup-floor/).
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
SYSTEM_CALLS = {"send", "recv", "connect", "close", "accept4", "socket", "epoll_ctl", "setsockopt", "getsockopt",
                "shutdown", "madvise", "getsockname", "getpid", "write", "read", "mmap", "munmap", "brk"}
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
if native:
    # A sample whose innermost frame is a libc system-call wrapper is in the kernel (or on its
    # way); epoll_wait is the worker waiting. The rest is user space, Python and C alike.
    waiting, in_kernel, user = 0, 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        leaf = frames[-1].split(" (")[0]
        if leaf == "epoll_wait":
            waiting += int(n)
        elif frames[-1].endswith("(libc.so.6)") and leaf in SYSTEM_CALLS:
            in_kernel += int(n)
        else:
            ours = [f.split(" (")[0] for f in frames if "sniproxy/" in f]
            user[ours[-1] if ours else "(event loop, outside the project)"] += int(n)
    busy = in_kernel + sum(user.values())
    print(f"busy: {100 * busy / total:.1f}% of samples; of those, {100 * in_kernel / busy:.1f}% in system calls "
          f"and {100 * sum(user.values()) / busy:.1f}% in user space, which is, by the deepest project function:")
    for frame, n in user.most_common(25):
        print(f"  {100 * n / sum(user.values()):5.1f}% {frame}")
