# A/B for NOTES.md (run with the project's .venv python: ROUNDS). The default policy, whose fast
# pairs in small segments go to splice (relay.kernel_segment = 0.5), against the same with
# kernel_segment = 0 (every fast pair to the kernel, as before), beside HAProxy with splice, on the
# bench's TLS download, bulk and mixed loads, in interleaved rounds; medians [range].
import resource
import statistics
import sys
from dataclasses import replace
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import measure, origins  # noqa: E402
from bench.scenarios import MODES, Bulk, Context, Mixed, TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
settings = replace(MODES["full"], idle_connections=2000)


class AllFastToKernel(Sniproxy):
    def __init__(self, *args):
        super().__init__(*args)
        self.name = "sniproxy-auto-segment0"

    def config(self, workers: int) -> str:
        return super().config(workers).replace('policy = "auto"\n', 'policy = "auto"\nkernel_segment = 0\n')


with origins.running("segab-", download_bytes=settings.download_bytes, nofile=hard) as (workdir, backends):
    systems = [Sniproxy(backends, workdir, "auto"), AllFastToKernel(backends, workdir, "auto"),
               HaproxySplice(backends, workdir, settings.idle_connections + 100)]
    ctx = Context(settings, workdir, backends.hold)
    values: dict[tuple[str, str], list[float]] = {}
    for system in systems:
        system.start(1)
    try:
        for r in range(rounds):
            for system in systems:
                for scenario in (TlsDownload(), Bulk(), Mixed()):
                    for metric, value in scenario.measure(system, ctx).items():
                        values.setdefault((system.name, f"{scenario.name} {metric}"), []).append(value)
                print(f"[round {r + 1}/{rounds}] {system.name}", file=sys.stderr, flush=True)
    finally:
        for system in systems:
            system.stop()
print("\n".join(measure.machine()))
for (name, metric), vs in sorted(values.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    print(f"{metric:40s} {name:28s} {statistics.median(vs):12.4g} [{min(vs):.4g}-{max(vs):.4g}]")
