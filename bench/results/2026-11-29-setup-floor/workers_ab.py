# For NOTES.md (run with the project's .venv python: ROUNDS). The connection rate with two workers
# at bpf.steering_backlog 4 (the default), 16 and 64, and with one worker, beside HAProxy with two
# threads, in bench/connrate's interleaved rounds (h2load, one TLS connection per request, 16 at a
# time): does sending more of the load to the first worker buy what one worker alone shows?
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import ab, measure, origins  # noqa: E402
from bench.systems import Haproxy, Sniproxy  # noqa: E402

loader = importlib.machinery.SourceFileLoader("connrate", str(REPO / "bench/connrate"))
connrate = importlib.util.module_from_spec(importlib.util.spec_from_loader("connrate", loader))
loader.exec_module(connrate)

print("\n".join(measure.machine()))
with origins.running("workers-ab-") as (workdir, backends):
    systems = [(Sniproxy(backends, workdir, "auto"), 2),
               *((ab.Variant(backends, workdir, "auto", f"sniproxy-auto-backlog{n}", "", f"steering_backlog = {n}\n"), 2)
                 for n in (16, 64)),
               (ab.Variant(backends, workdir, "auto", "sniproxy-auto-1-worker", ""), 1),
               (Haproxy(backends, workdir, 4096), 2)]
    try:
        for system, workers in systems:
            system.start(workers)
        runs = connrate.measure_rounds([system for system, _ in systems], 3, int(sys.argv[1]))
    finally:
        for system, _ in systems:
            system.stop()
connrate.print_table(runs)
