# Scratch A/B for NOTES.md (run with the project's .venv python). Connection rate: sniproxy copy unpinned, pinned (one CPU per worker), pinned + SO_INCOMING_CPU; haproxy
import os, sys, runpy, subprocess, ctypes, socket, re
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import origins, measure
from bench.systems import Sniproxy, Haproxy
cr = runpy.run_path(str(REPO / "bench" / "connrate"), run_name="connrate")
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
libc = ctypes.CDLL(None, use_errno=True)
SO_INCOMING_CPU = 49

def listening_fds(pid):
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    return [int(m) for line in out.splitlines() for m in re.findall(rf"pid={pid},fd=(\d+)", line)]

def set_incoming_cpu(pid, cpu):
    pidfd = os.pidfd_open(pid)
    for fd in listening_fds(pid):
        local = libc.syscall(438, pidfd, fd, 0)
        assert local >= 0, ctypes.get_errno()
        s = socket.socket(fileno=local)
        s.setsockopt(socket.SOL_SOCKET, SO_INCOMING_CPU, cpu)
        s.detach(); os.close(local)
    os.close(pidfd)

with origins.running("pin-") as (workdir, backends):
    a = Sniproxy(backends, workdir, "copy")
    b = Sniproxy(backends, workdir, "copy"); b.name = "sniproxy-copy-pinned"
    c = Sniproxy(backends, workdir, "copy"); c.name = "sniproxy-copy-pinned-incpu"
    h = Haproxy(backends, workdir, 4096)
    systems = [a, b, c, h]
    try:
        for s in systems:
            s.start(2)
        for s, incpu in ((b, False), (c, True)):
            workers = sorted(pid for pid in s.pids() if pid != s._proc.pid)
            for cpu, pid in enumerate(workers):
                os.sched_setaffinity(pid, {cpu})
                if incpu:
                    set_incoming_cpu(pid, cpu)
            print(s.name, "workers", workers, file=sys.stderr)
        runs = cr["measure_rounds"](systems, 3, rounds)
    finally:
        for s in systems:
            s.stop()
print("\n".join(measure.machine()))
cr["print_table"](runs)
