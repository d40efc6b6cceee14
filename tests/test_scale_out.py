"""Scale-out: two proxy instances behind the kernel's own L4 balancer, and a PROXY v2
header to the backend, so the backend sees the real client through both layers.

    client --veth-- lb --veth-- p1 (sniproxy)
                     |--veth-- p2 (sniproxy)
                     +--veth-- be (HAProxy, accept-proxy) --> TLS backend on root loopback

lb forwards between the others and DNATs the VIP to p1 or p2 with nftables numgen (this
kernel has nf_tables but no IPVS). Every namespace is the test's own, and none is joined
to the root namespace.
"""
import dataclasses
import ipaddress
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port, unique, wait_until
from netns import TEST_RANGE_V4, _used_subnet_indexes, ip
from test_proxy import make_config, stats

CONNECTIONS = 20
PORT = 443
ROLES = ("client", "p1", "p2", "be")     # each joined to lb by a veth pair of its own


@dataclasses.dataclass(frozen=True)
class ScaleOutNet:
    ns: dict[str, str]                   # role -> namespace name ("lb" and ROLES)
    lb: dict[str, str]                   # role -> lb's address on that role's link
    addr: dict[str, str]                 # role -> the role's own address
    clients: tuple[str, ...]             # client source addresses
    vip: str

    def exec(self, role: str, *argv: str, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(["ip", "netns", "exec", self.ns[role], *argv], capture_output=True, text=True,
                             timeout=20, **kw)
        assert out.returncode == 0, f"{argv[0]} in {role} exited with {out.returncode}:\n{out.stderr}"
        return out

    def wrap(self, role: str):
        return lambda argv: ["ip", "netns", "exec", self.ns[role], *argv]


def _subnet() -> ipaddress.IPv4Network:
    """A /24 of 198.18.0.0/15 that the root namespace does not use now, as tests/netns.py
    picks one. Nothing here reaches the root namespace, so nothing needs claiming under
    its lock: the choice only keeps addresses in logs unambiguous."""
    free = sorted(set(range(1 << (24 - TEST_RANGE_V4.prefixlen))) - _used_subnet_indexes())
    return ipaddress.ip_network((int(TEST_RANGE_V4.network_address) + (random.choice(free) << 8), 24))


@pytest.fixture
def scale_out():
    """The namespaces above, deleted after the test even when it fails."""
    tag = unique("sniproxy-scale")
    net = _subnet()
    links = {role: list(net.subnets(new_prefix=28))[i] for i, role in enumerate(ROLES)}
    topo = ScaleOutNet(ns={role: f"{tag}-{role}" for role in ("lb", *ROLES)},
                       lb={role: str(links[role][1]) for role in ROLES},
                       addr={role: str(links[role][2]) for role in ROLES},
                       clients=tuple(str(links["client"][2 + i]) for i in range(4)),
                       vip=str(net[200]))           # on no interface: lb DNATs it before routing
    try:
        for name in topo.ns.values():
            ip("netns", "add", name)
            ip("link", "set", "lo", "up", netns=name)
        for role in ROLES:
            ip("link", "add", role, "type", "veth", "peer", "name", "lb", "netns", topo.ns[role], netns=topo.ns["lb"])
            ip("addr", "add", f"{topo.lb[role]}/28", "dev", role, netns=topo.ns["lb"])
            ip("link", "set", role, "up", netns=topo.ns["lb"])
            for a in topo.clients if role == "client" else (topo.addr[role],):
                ip("addr", "add", f"{a}/28", "dev", "lb", netns=topo.ns[role])
            ip("link", "set", "lb", "up", netns=topo.ns[role])
            # Replies from p1/p2 must go back through lb, whose conntrack turns their
            # source back into the VIP.
            ip("route", "add", "default", "via", topo.lb[role], netns=topo.ns[role])
        topo.exec("lb", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # DNAT rewrites only the destination: p1 and p2 see the client's own address, so
        # they need no PROXY header from the balancer (no accept_proxy). `inc` takes turns
        # per new connection (the nat chain sees only a connection's first packet).
        topo.exec("lb", "nft", "-f", "-", input=(
            "table ip nat {\n  chain prerouting {\n    type nat hook prerouting priority dstnat;\n"
            f"    ip daddr {topo.vip} tcp dport {PORT} dnat to numgen inc mod 2 map "
            f"{{ 0 : {topo.addr['p1']}, 1 : {topo.addr['p2']} }}\n  }}\n}}\n"))
        yield topo
    finally:
        # The veths and the nftables table go with their namespaces.
        for name in topo.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# Runs in the client namespace: one TLS connection after another to the VIP, each from the
# next client address and a port of its own, echoing a payload of its own.
CLIENT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from harness import recv_exactly, tls_client
vip, port, sources, n = sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), int(sys.argv[5])
for i in range(n):
    payload = os.urandom(40000 + i)
    with tls_client(port, "example.com", host=vip, source=(sources[i % len(sources)], 0)) as s:
        me = "%s:%d" % s.getsockname()[:2]
        s.sendall(payload)
        ok = recv_exactly(s, len(payload)) == payload
    print(json.dumps({"client": me, "echoed": ok}))
"""


def access_lines(p) -> dict[str, dict[str, str]]:
    """The master's access-log lines (written to its output), by client address."""
    records = (dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
               for line in p.output().splitlines() if " client=" in line and " outcome=" in line)
    return {r["client"]: r for r in records}


@pytest.mark.timeout(60)
def test_two_instances_behind_nftables_dnat_pass_the_client_to_the_backend(scale_out, backends, haproxy, proxy):
    net = scale_out
    a = backends("a")
    ready = free_port()
    # HAProxy runs here but listens in be (bind ... namespace); it reads the PROXY v2
    # header and logs the client it names. The 127.0.0.1 listener only tells the harness
    # that HAProxy is up (it binds everything at once).
    peer = haproxy("be", f"frontend fe\n  bind {net.addr['be']}:{PORT} namespace {net.ns['be']} accept-proxy\n"
                         '  log-format "client=%ci:%cp up=%U down=%B authority=%[fc_pp_authority]"\n'
                         f"  default_backend be\nbackend be\n  server s1 {a.address}\n"
                         f"listen ready\n  bind 127.0.0.1:{ready}\n  no log\n", (ready,))
    backend = f"{net.addr['be']}:{PORT}"
    instances = {}
    for role in ("p1", "p2"):
        # bpf.mode "off" (make_config's default): under `ip netns exec`, a mount namespace of
        # its own, the master would pin into a bpffs that only it sees, out of reach of
        # `maps` and of cleanup from here. The relay kind does not change the path under test.
        config = make_config(PORT, [("example.com", backend)], host=net.addr[role], workers=1).replace(
            f'backend = "{backend}"', f'backend = "{backend}"\nproxy_protocol = "v2"')
        instances[role] = proxy(config, wrap=net.wrap(role))

    out = net.exec("client", sys.executable, "-c", CLIENT, str(Path(__file__).parent), net.vip, str(PORT),
                   ",".join(net.clients), str(CONNECTIONS))
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == CONNECTIONS and all(r["echoed"] for r in results)
    clients = {r["client"] for r in results}
    assert len(clients) == CONNECTIONS
    assert {c.rsplit(":", 1)[0] for c in clients} == set(net.clients)

    # Each instance served its turn of the connections, and saw the clients' own addresses.
    wait_until(lambda: sum(len(access_lines(p)) for p in instances.values()) == CONNECTIONS,
               timeout=10, what="an access-log line per connection")
    seen = {role: access_lines(p) for role, p in instances.items()}
    assert [len(seen["p1"]), len(seen["p2"])] == [CONNECTIONS // 2, CONNECTIONS // 2]
    assert set(seen["p1"]) | set(seen["p2"]) == clients
    for role, p in instances.items():
        counters = stats(p)
        assert counters["accepted"] == counters["relayed_userspace"] == CONNECTIONS // 2, role
        assert (counters["bytes_up_userspace"], counters["bytes_down_userspace"]) == \
            tuple(sum(int(r[k]) for r in seen[role].values()) for k in ("up", "down")), role

    # The backend saw every client's address and port through both layers (not p1's, p2's
    # or lb's), the name from the v2 header, and the bytes each proxy relayed.
    wait_until(lambda: sum(line.startswith("client=") for line in peer.lines()) == CONNECTIONS,
               timeout=10, what="HAProxy's log line per connection")
    logged = {r["client"]: r for r in (dict(f.split("=", 1) for f in line.split())
                                       for line in peer.lines() if line.startswith("client="))}
    assert set(logged) == clients
    assert {r["authority"] for r in logged.values()} == {"example.com"}
    relayed = {**seen["p1"], **seen["p2"]}
    assert {c: (r["up"], r["down"]) for c, r in logged.items()} == \
        {c: (r["up"], r["down"]) for c, r in relayed.items()}
