import sys
from pathlib import Path
sys.path.insert(0, "/work/main")
from bench import ab  # noqa: E402
from bench.scenarios import TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy  # noqa: E402


class Lowat(Sniproxy):
    def __init__(self, backends, workdir, lowat):
        super().__init__(backends, workdir, "splice", ("lowat", Path("/tmp/wt-lowat")))
        self.lowat = lowat
        self.name = f"sniproxy-splice-lowat-{lowat >> 10}k"

    def command(self, config_path):
        return ["env", f"SNIPROXY_LOWAT={self.lowat}"] + super().command(config_path)


ab.print_rounds(ab.run("lowatab-", lambda backends, workdir: [
    Sniproxy(backends, workdir, "splice"), Lowat(backends, workdir, 256 << 10), Lowat(backends, workdir, 64 << 10),
    HaproxySplice(backends, workdir, 200)], [TlsDownload()], idle_connections=100))
