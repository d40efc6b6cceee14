# For NOTES.md (run with the project's .venv python: ROUNDS COUNT). New connections through one
# worker of this proxy to a backend in a network namespace behind a veth pair (198.18.0.0/15),
# whose TCP takes Fast Open (tests/netns.py): the route "fast.test" has fastopen = true, "plain.test" not. Each
# connection sends an HTTP request head and reads the backend's answer to its end; the client
# times it from before connect() to the close. The two routes alternate, connection by
# connection; medians and p90 per round, and the namespace's Fast Open count.
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from bench import measure, procs  # noqa: E402
from netns import veth_netns  # noqa: E402

def fetch(port: int, host: str) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while s.recv(65536):
            pass
    return time.perf_counter() - started


rounds, count = int(sys.argv[1]), int(sys.argv[2])
print("\n".join(measure.machine()))
with veth_netns(1) as ns, tempfile.TemporaryDirectory(prefix="fastopen-") as workdir:
    backend = ns.fast_open_echo(ns.peer_v4s[0], 7000)
    port = procs.free_port()
    address = f"{ns.peer_v4s[0]}:7000"
    config = Path(workdir) / "sniproxy.toml"
    config.write_text(f'[master]\nworkers = 1\n[bpf]\nmode = "off"\n[log]\naccess = ""\n'
                      f'[[listener]]\naddress = "127.0.0.1:{port}"\nprotocol = "http"\n'
                      f'[[table.default]]\nmatch = "fast.test"\nbackend = "{address}"\nfastopen = true\n'
                      f'[[table.default]]\nmatch = "plain.test"\nbackend = "{address}"\n')
    master = procs.spawn([str(REPO / ".venv/bin/sniproxy-master"), "start", "--foreground", "-c", str(config)],
                         Path(workdir) / "master.log")
    try:
        procs.wait_listening(master, [port], Path(workdir) / "master.log", timeout=30)
        for host in ("fast.test", "plain.test") * 50:   # warm up; the first fast one fetches the cookie
            fetch(port, host)
        before = ns.tcp_counter("TCPFastOpenPassive")
        print(f"{count} connections per route per round, alternating; ms from connect to the answer's end")
        print(f"{'round':>5} {'fastopen p50':>13} {'plain p50':>10} {'ratio':>6} {'fastopen p90':>13} {'plain p90':>10}")
        for number in range(1, rounds + 1):
            times = {"fast.test": [], "plain.test": []}
            for _ in range(count):
                for host in times:
                    times[host].append(fetch(port, host))
            fast, plain = (statistics.median(times[h]) * 1e3 for h in times)
            fast90, plain90 = (statistics.quantiles(times[h], n=10)[-1] * 1e3 for h in times)
            print(f"{number:5d} {fast:13.3f} {plain:10.3f} {fast / plain:6.2f} {fast90:13.3f} {plain90:10.3f}")
        print(f"Fast Open accepts in the backend's namespace: {ns.tcp_counter('TCPFastOpenPassive') - before} "
              f"of {rounds * count} fastopen connections")
    finally:
        procs.stop(master, grace=5)
        backend.kill()
