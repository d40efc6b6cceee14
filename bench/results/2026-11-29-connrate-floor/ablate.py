# For NOTES.md (run with the project's .venv python: ROUNDS WORKERS POLICY REV [VARIANTS]). This
# proxy as of git revision REV, and copies of it with one piece of a connection's work taken out,
# side by side in bench/connrate's interleaved rounds: how much of the user time per connection
# each piece costs. Not a working proxy: each variant drops what it names.
#   noparse    the ClientHello parser answers the bench's name at once
#   fastrelay  the copy relay's read callback is floor.py's (no limits, handoff or timers)
#   norecord   no access-log record and no counters
# "compiled" adds REV with the parser compiled by its setup.py (2204bde and later).
import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import measure, origins  # noqa: E402
from bench.systems import Haproxy, Sniproxy  # noqa: E402

loader = importlib.machinery.SourceFileLoader("connrate", str(REPO / "bench/connrate"))
connrate = importlib.util.module_from_spec(importlib.util.spec_from_loader("connrate", loader))
loader.exec_module(connrate)

PATCHES = {
    "noparse": [("firstflight.py", "def parse_client_hello(data: bytes) -> FirstFlight | NeedMoreType:\n",
                 "def parse_client_hello(data: bytes) -> FirstFlight | NeedMoreType:\n"
                 "    if data[:1] == b'\\x16':\n        return FirstFlight('origin.bench.test', ('http/1.1',), '')\n")],
    "fastrelay": [("userspace_relay.py", "    def __call__(self) -> None:\n        self.pair._on_ready(self)\n", '''\
    def __call__(self) -> None:
        src, dst, buf = self.src, self.dst, _BUF
        while True:
            try:
                n = src.recv_into(buf, 0, _NOWAIT)
            except BlockingIOError:
                return
            except OSError:
                return self.pair._end("reset")
            if not n:
                self.eof = True
                self.watcher.close()
                self.watcher = self.watched = None
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if self.pair.up.eof and self.pair.down.eof:
                    self.pair._end("done")
                return
            self.count += n
            dst.send(_MV[:n], _NOWAIT)
            if n < len(buf):
                return
'''), ("userspace_relay.py", "_NOWAIT = socket.MSG_DONTWAIT",
       "_NOWAIT = socket.MSG_DONTWAIT\n_BUF = bytearray(256 * 1024)\n_MV = memoryview(_BUF)")],
    "norecord": [
        ("connection.py", '''self.record = {"client": _fmt_peer(peer), "listener": lc.address, "name": "-", "alpn": "-",
                       "backend": "-", "up": 0, "down": 0, "relay": "-", "outcome": ""}''', "self.record = {}"),
        ("connection.py", 'self.record["backend"] = str(HostPort(address, port))', "pass"),
        ("connection.py", '''        self.ctx.counters.add("accepted")
        self._count_listener("accepted")''', "        pass"),
        ("connection.py", '''        record["name"] = flight.name or f"({flight.name_problem})"
        record["alpn"] = ",".join(flight.alpn) or "-"''', "        pass"),
        ("connection.py", '''    counters = ctx.counters
    counters.add(f"relayed_{result.kind}")''', "    return"),
    ],
}


def tree(workdir: Path, revision: str, variant: str) -> Path:
    path = workdir / f"tree-{variant}"
    path.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "sniproxy", "bpf"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
    for name, old, new in PATCHES.get(variant, []):
        source = path / "sniproxy" / name
        text = source.read_text()
        assert old in text, (variant, old[:50])
        source.write_text(text.replace(old, new, 1))
    return path


rounds, workers, policy, revision = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
variants = sys.argv[5].split(",") if len(sys.argv) > 5 else ["head", *PATCHES]
print("\n".join(measure.machine()))
with origins.running("connrate-ablate-") as (workdir, backends):
    systems = [Sniproxy(backends, workdir, policy,
                        (variant, connrate._tree_of("2204bde", workdir) if variant == "compiled"
                         else tree(workdir, revision, variant)))
               for variant in variants] + [Haproxy(backends, workdir, 4096)]
    try:
        for system in systems:
            system.start(workers)
        runs = connrate.measure_rounds(systems, 3, rounds)
    finally:
        for system in systems:
            system.stop()
connrate.print_table(runs)
