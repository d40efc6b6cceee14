# For NOTES.md (run with the project's .venv python: ROUNDS). The floor of a Python setup path with
# Python pairs (../2026-11-29-connrate-floor/floor.py) and with C pairs (floor_c.py), beside this
# proxy (one worker, relay.policy = "auto") and HAProxy (one thread), in bench/connrate's
# interleaved rounds: h2load opens one TLS connection per request through each.
import importlib.machinery
import importlib.util
import subprocess
import sys
import time
from pathlib import Path
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO))
from bench import measure, origins, procs  # noqa: E402
from bench.systems import Haproxy, Sniproxy, System  # noqa: E402

loader = importlib.machinery.SourceFileLoader("connrate", str(REPO / "bench/connrate"))
connrate = importlib.util.module_from_spec(importlib.util.spec_from_loader("connrate", loader))
loader.exec_module(connrate)


class Floor(System):
    has_processes = True

    def __init__(self, backends, workdir, name, script):
        super().__init__(backends, workdir)
        self.name, self.script = name, script

    def start(self, workers=1):
        self.port = procs.free_port()
        self.proc = subprocess.Popen([sys.executable, str(self.script), str(self.port),
                                      str(self.origins.tls)])
        time.sleep(1.5)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def pids(self):
        return [self.proc.pid]

    def address(self, route):
        return "127.0.0.1", self.port


print("\n".join(measure.machine()))
with origins.running("connrate-floor-") as (workdir, backends):
    systems = [Floor(backends, workdir, "floor-python-pairs", HERE.parent / "2026-11-29-connrate-floor/floor.py"),
               Floor(backends, workdir, "floor-c-pairs", HERE / "floor_c.py"),
               Sniproxy(backends, workdir, "auto"), Haproxy(backends, workdir, 4096)]
    try:
        for system in systems:
            system.start(1)
        runs = connrate.measure_rounds(systems, 3, int(sys.argv[1]))
    finally:
        for system in systems:
            system.stop()
connrate.REFERENCE = "haproxy"
connrate.print_table(runs)
