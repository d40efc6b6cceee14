# For NOTES.md (run with the project's .venv python): how full, as a share of the MSS, the
# segments of each fast pair were when the default policy judged it in copy (its debug log),
# over ROUNDS of the bench's TLS download and bulk loads. It needs sniproxy/ of 03526c4, the
# revision that logged the fill.
import re
import sys
from dataclasses import replace
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import origins, procs  # noqa: E402
from bench.scenarios import MODES, Bulk, Context, TlsDownload  # noqa: E402
from bench.systems import Sniproxy  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
hard = procs.raise_fd_limit()
settings = replace(MODES["full"], idle_connections=200)
FILL = re.compile(r"fast, in segments that fill (\d\.\d+)")


class Debug(Sniproxy):
    def config(self, workers: int) -> str:
        return super().config(workers).replace('level = "warning"', 'level = "debug"')


with origins.running("fills-", download_bytes=settings.download_bytes, nofile=hard) as (workdir, backends):
    system = Debug(backends, workdir, "auto")
    system.start(1)
    log = workdir / f"{system.name}.log"
    ctx = Context(settings, workdir, backends.hold)
    fills: dict[str, list[str]] = {}
    try:
        for _ in range(rounds):
            for scenario in (TlsDownload(), Bulk()):
                before = len(FILL.findall(log.read_text()))
                scenario.measure(system, ctx)
                fills.setdefault(scenario.name, []).extend(FILL.findall(log.read_text())[before:])
    finally:
        system.stop()
for name, found in fills.items():
    print(f"{name}: {len(found)} fast pairs, filling {', '.join(sorted(found))}")
