# For NOTES.md (run with the project's .venv python: ROUNDS GRO). The bench's TLS download with
# the nginx origin in a network namespace of its own, behind a veth pair (198.18.0.0/15), rather
# than on loopback: direct, through auto, the splice relay alone and HAProxy with splice, one
# worker (thread) each, in interleaved rounds; GRO on the veth pair "on" or "off"; medians.
import sys
from dataclasses import replace
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from bench import ab, measure, origins, procs  # noqa: E402
from bench.scenarios import MODES, Context, TlsDownload  # noqa: E402
from bench.systems import HaproxySplice, Sniproxy, System  # noqa: E402
from netns import veth_netns  # noqa: E402

PORT = 8443


SET_GRO = """
import sys
from pyroute2.ethtool import Ethtool
ethtool = Ethtool()
features = ethtool.get_features(sys.argv[1])
features.features["rx-gro"].enable = sys.argv[2] == "on"
ethtool.set_features(sys.argv[1], features)
assert ethtool.get_features(sys.argv[1]).features["rx-gro"].enable == (sys.argv[2] == "on")
"""


def behind(cls, peer: str, loopback_port: int):
    """cls, with its TLS origin at peer:PORT instead of on loopback."""
    class Behind(cls):
        def config(self, workers):
            return super().config(workers).replace(f"127.0.0.1:{loopback_port}", f"{peer}:{PORT}")

        def address(self, route):
            return (peer, PORT) if route == "tls" and cls is System else super().address(route)
    return Behind


rounds, gro = int(sys.argv[1]), sys.argv[2] == "on"
settings = replace(MODES["full"], idle_connections=0)
with origins.running("tls-veth-", download_bytes=settings.download_bytes,
                     nofile=procs.raise_fd_limit()) as (workdir, backends), veth_netns(1) as ns:
    peer = ns.peer_v4s[0]
    procs.run([sys.executable, "-c", SET_GRO, ns.host_ifname, sys.argv[2]], 30)
    if (inside := ns.python(SET_GRO, ns.peer_ifname, sys.argv[2])).returncode:
        raise RuntimeError(f"GRO in {ns.name}: {inside.stderr.strip()}")
    conf = workdir / "veth-nginx.conf"
    conf.write_text(origins.NGINX_ORIGIN.format(dir=workdir, nofile=4096, tls_port=PORT, hold_port=PORT + 1)
                    .replace("127.0.0.1", peer).replace("origin-nginx.pid", "veth-nginx.pid"))
    nginx = procs.spawn(["ip", "netns", "exec", ns.name, "nginx", "-p", str(workdir), "-c", str(conf),
                         "-e", "stderr", "-g", "daemon off;"], workdir / "veth-nginx.log")
    try:
        procs.wait_listening(nginx, [PORT], workdir / "veth-nginx.log", timeout=10)
    except RuntimeError:
        pass   # listening in another namespace: the first download tells
    systems = [behind(System, peer, backends.tls)(backends, workdir),
               *(behind(Sniproxy, peer, backends.tls)(backends, workdir, policy) for policy in ("auto", "splice")),
               behind(HaproxySplice, peer, backends.tls)(backends, workdir, 100)]
    values = ab.measure_rounds(systems, [TlsDownload()], Context(settings, workdir, backends.hold), rounds)
print("\n".join(measure.machine()))
print(f"GRO on the veth pair: {'on' if gro else 'off'}")
ab.print_medians(values)
