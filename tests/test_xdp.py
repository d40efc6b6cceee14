"""xdp_ip_filter on the host side of a veth pair, probed from a namespace behind it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess

import pytest

from sniproxy import bpfload, xdp
from sniproxy.sourcefilter import SourceFilter

from netns import veth_netns

pytestmark = pytest.mark.bpf

REFUSED_CONNECT_TIMEOUT = 1.0

# Runs inside the namespace: connect from a chosen source address and send it
# as the payload, so the listener can tell who got through.
TCP_CLIENT = """
import socket, sys
src, dst, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET)
s.settimeout(timeout)
s.bind((src, 0))
try:
    s.connect((dst, port))
except TimeoutError:
    print("timeout")
else:
    s.sendall(src.encode())
    s.close()
    print("connected")
"""

UDP_SENDER = """
import socket, sys
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
for i in range(count):
    s.sendto(b"probe %d" % i, (dst, port))
"""


@pytest.fixture
def pins(pin_path):
    loaded = bpfload.load(pin_path, programs=("xdp_filter",))
    try:
        yield pin_path
    finally:
        loaded.unpin()


@pytest.fixture
def ns():
    with veth_netns() as ns:
        yield ns


@pytest.fixture
def attached(request, pins, ns):
    """The filter on the host side of the veth (generic mode unless parametrized); detached at the end."""
    mode = getattr(request, "param", "generic")
    flags = xdp.attach(pins, ns.host_ifname, mode)
    assert flags == xdp.MODE_FLAGS[mode][0]
    try:
        yield pins
    finally:
        with contextlib.suppress(xdp.XdpError):
            xdp.detach(ns.host_ifname, flags)


@contextlib.contextmanager
def listening(address: str):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        s.listen(16)
        yield s


def connect_from(ns, src: str, listener: socket.socket) -> bool:
    """Whether src reaches listener: the client connects and the listener receives src."""
    dst, port = listener.getsockname()[:2]
    out = ns.python(TCP_CLIENT, src, dst, str(port), str(REFUSED_CONNECT_TIMEOUT)).stdout.strip()
    if out != "connected":
        assert out == "timeout"
        return False
    listener.settimeout(5.0)
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5.0)
        assert conn.recv(100) == src.encode()
    return True


def dropped_by(pins, ns, src: str, dst: str, count: int) -> dict[str, int]:
    """Send count datagrams from src; return how each XDP counter moved."""
    before = xdp.xdp_counters(pins)
    result = ns.python(UDP_SENDER, src, dst, "9", str(count))
    assert result.returncode == 0, result.stderr
    after = xdp.xdp_counters(pins)
    return {k: after[k] - before[k] for k in after}


def bpftool_json(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], check=True,
                                     capture_output=True, text=True).stdout)


def pinned_program_id(pins) -> int:
    return bpftool_json("prog", "show", "pinned", f"{pins}/xdp_ip_filter")["id"]


def xdp_attachments(ifname: str) -> list[tuple[str, int]]:
    """(mode, program id) of each XDP program `bpftool net show` lists on ifname."""
    return [(x["mode"], x["id"]) for dev in bpftool_json("net", "show", "dev", ifname) for x in dev["xdp"]]


def test_program_is_pinned_as_xdp(pins):
    prog = bpftool_json("prog", "show", "pinned", f"{pins}/xdp_ip_filter")
    assert prog["type"] == "xdp"
    assert prog["name"] == "xdp_ip_filter"


@pytest.mark.parametrize("attached", ["generic", "native"], indirect=True)  # veth has native XDP
def test_denied_source_is_dropped_and_counted(attached, ns):
    allowed, denied = ns.peer_v4s[0], ns.peer_v4s[1]
    xdp.load_access_rules(attached, allow=[], deny=[f"{denied}/32"])
    with listening(ns.host_v4) as listener:
        assert connect_from(ns, allowed, listener)
        before = xdp.xdp_counters(attached)["dropped_deny"]
        assert not connect_from(ns, denied, listener)
        assert xdp.xdp_counters(attached)["dropped_deny"] > before  # the SYN, maybe a retry
    moved = dropped_by(attached, ns, denied, ns.host_v4, 25)
    assert moved["dropped_deny"] == 25
    assert moved["dropped_not_allowed"] == 0


def test_allow_list_drops_everyone_else(attached, ns):
    allowed, outsider = ns.peer_v4s[0], ns.peer_v4s[1]
    xdp.load_access_rules(attached, allow=[allowed], deny=[])
    with listening(ns.host_v4) as listener:
        assert connect_from(ns, allowed, listener)
        assert not connect_from(ns, outsider, listener)
    moved = dropped_by(attached, ns, outsider, ns.host_v4, 25)
    assert moved["dropped_not_allowed"] >= 25  # plus any stray IPv6 multicast from the peer
    assert moved["dropped_deny"] == 0


def test_deny_wins_over_allow_and_matches_access_list(attached, ns):
    subnet = f"{ns.host_v4}/24"
    allow, deny = [subnet], [ns.peer_v4s[2]]
    xdp.load_access_rules(attached, allow=allow, deny=deny)
    access = SourceFilter(allow, deny)
    with listening(ns.host_v4) as listener:
        for src in ns.peer_v4s:
            assert connect_from(ns, src, listener) == access.allows(src), src
    assert [access.allows(src) for src in ns.peer_v4s] == [True, True, False]


def test_ports_only_mode_leaves_other_ports_alone(attached, ns):
    denied = ns.peer_v4s[1]
    with listening(ns.host_v4) as guarded, listening(ns.host_v4) as other:
        xdp.load_access_rules(attached, allow=[], deny=[denied], ports=[guarded.getsockname()[1]])
        assert not connect_from(ns, denied, guarded)
        assert connect_from(ns, denied, other)
    # Traffic that is not TCP is out of scope too.
    assert dropped_by(attached, ns, denied, ns.host_v4, 10)["dropped_deny"] == 0


def test_ipv6_sources_and_neighbour_discovery(attached, ns):
    allowed, denied = ns.peer_v6s[0], ns.peer_v6s[1]
    # Only IPv6 entries: IPv4 sources fall outside the allow list, while
    # neighbour discovery must still pass or no IPv6 packet could be sent.
    xdp.load_access_rules(attached, allow=[f"{ns.host_v6}/64"], deny=[f"{denied}/128"])
    with listening(ns.host_v6) as listener:
        assert connect_from(ns, allowed, listener)
        assert not connect_from(ns, denied, listener)
    with listening(ns.host_v4) as listener:
        assert not connect_from(ns, ns.peer_v4s[0], listener)
    assert dropped_by(attached, ns, denied, ns.host_v6, 7)["dropped_deny"] == 7


def test_detach_lets_traffic_through(pins, ns):
    denied = ns.peer_v4s[1]
    xdp.load_access_rules(pins, allow=[], deny=[denied])
    flags = xdp.attach(pins, ns.host_ifname, "generic")
    try:
        with listening(ns.host_v4) as listener:
            assert not connect_from(ns, denied, listener)
            assert xdp_attachments(ns.host_ifname) == [("generic", pinned_program_id(pins))]
    finally:
        xdp.detach(ns.host_ifname, flags)
    assert xdp_attachments(ns.host_ifname) == []
    with listening(ns.host_v4) as listener:
        assert connect_from(ns, denied, listener)


def test_auto_mode_attaches_generic_on_a_veth_and_native_when_asked(pins, ns):
    """Native XDP on a veth would take software GSO from its peer; "auto" avoids it."""
    for mode, expected in (("auto", "generic"), ("native", "driver")):
        flags = xdp.attach(pins, ns.host_ifname, mode)
        try:
            assert xdp_attachments(ns.host_ifname) == [(expected, pinned_program_id(pins))]
        finally:
            xdp.detach(ns.host_ifname, flags)
        assert xdp_attachments(ns.host_ifname) == []
    assert xdp.mode_flags("lo", "auto") == (xdp.XDP_FLAGS_DRV_MODE, xdp.XDP_FLAGS_SKB_MODE)


def test_attach_to_missing_interface_fails_clearly(pins):
    with pytest.raises(xdp.XdpError, match="no interface"):
        xdp.attach(pins, "sniproxy-none", "generic")


def test_reload_replaces_rules(pins):
    xdp.load_access_rules(pins, allow=["198.18.0.0/15", "fd53::/16"], deny=["10.1.2.3", "10.9.0.0/16"],
                          ports=[443, 8443])
    xdp.load_access_rules(pins, allow=[], deny=["10.0.0.0/8"], ports=[443])

    def entries(name):
        dump = bpftool_json("map", "dump", "pinned", os.path.join(pins, name))
        return [e["formatted"] for e in dump]  # "formatted" needs the map's BTF

    deny = entries("ACCESS_DENY_V4")
    assert [(e["key"]["prefixlen"], e["key"]["addr"]) for e in deny] == [(8, [10, 0, 0, 0])]
    assert entries("ACCESS_ALLOW_V4") == [] and entries("ACCESS_ALLOW_V6") == []
    assert [e["key"] for e in entries("XDP_PORTS")] == [443]
    assert entries("XDP_CONFIG")[0]["value"] == {"allow_list_active": 0, "ports_only": 1}
