# For NOTES.md (run with the project's .venv python: ROUNDS). floor.py, with and without a timer
# per pair, beside this proxy's copy relay (one worker, relay.policy = "copy"), in bench/connrate's
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
from bench.systems import Sniproxy, System  # noqa: E402

loader = importlib.machinery.SourceFileLoader("connrate", str(REPO / "bench/connrate"))
connrate = importlib.util.module_from_spec(importlib.util.spec_from_loader("connrate", loader))
loader.exec_module(connrate)


class Floor(System):
    """floor.py, run with its extra arguments (a mode)."""
    has_processes = True

    def __init__(self, backends, workdir, name, *extra):
        super().__init__(backends, workdir)
        self.name, self.extra = name, extra

    def start(self, workers=1):
        self.port = procs.free_port()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "floor.py"), str(self.port),
                                      str(self.origins.tls), *self.extra])
        time.sleep(1.5)

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def pids(self):
        return [self.proc.pid]

    def address(self, route):
        return "127.0.0.1", self.port


def run(systems_of, rounds: int, reference: str) -> None:
    """The systems that systems_of(backends, workdir) makes, one worker (thread) each, over
    rounds; prints the machine and their table, with rates against reference's."""
    print("\n".join(measure.machine()))
    with origins.running("connrate-floor-") as (workdir, backends):
        systems = systems_of(backends, workdir)
        try:
            for system in systems:
                system.start(1)
            runs = connrate.measure_rounds(systems, 3, rounds)
        finally:
            for system in systems:
                system.stop()
    connrate.REFERENCE = reference
    connrate.print_table(runs)


if __name__ == "__main__":   # ../2026-11-29-setup-floor/floor_ab.py borrows Floor and run
    run(lambda backends, workdir: [Floor(backends, workdir, "floor"), Floor(backends, workdir, "floor+timer", "timer"),
                                   Sniproxy(backends, workdir, "copy")], int(sys.argv[1]), "sniproxy-copy")
