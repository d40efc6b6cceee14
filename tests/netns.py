"""Throwaway network namespaces joined to the root namespace by a veth pair.

Each pair gets a /24 of its own from 198.18.0.0/15 (and a ULA /64), chosen
under a lock among the subnets no interface of the root namespace uses, so
tests running in parallel never share a route. The host side stays in the
root namespace; the peer side, with several addresses to use as distinct
sources, lives in the namespace.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import random
import subprocess
import sys
import uuid
from typing import Iterator

TEST_RANGE_V4 = ipaddress.ip_network("198.18.0.0/15")
TEST_RANGE_V6 = ipaddress.ip_network("fd53:6e69:7072::/48")  # ULA, never routed
ALLOCATION_LOCK = "/run/lock/sniproxy-test-veth.lock"


def ip(*args: str, netns: str | None = None) -> str:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    return subprocess.run(prefix + list(args), check=True, capture_output=True, text=True).stdout


@dataclasses.dataclass(frozen=True)
class VethNetns:
    name: str
    host_ifname: str
    peer_ifname: str
    host_v4: str
    peer_v4s: tuple[str, ...]
    host_v6: str
    peer_v6s: tuple[str, ...]

    def exec(self, argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.name, *argv],
                              capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run code with this interpreter inside the namespace; args become sys.argv[1:]."""
        return self.exec([sys.executable, "-c", code, *args], timeout=timeout)

    def tcp_counter(self, name: str) -> int:
        """One of the namespace's own TcpExt counters (/proc/net/netstat), e.g. TCPFastOpenPassive."""
        names, values = [line.split() for line in self.exec(["cat", "/proc/net/netstat"]).stdout.splitlines()
                         if line.startswith("TcpExt:")]
        return int(dict(zip(names, values))[name])

    def fast_open_echo(self, address: str, port: int) -> subprocess.Popen:
        """A server on address:port in the namespace that takes TCP Fast Open (turned on for this
        namespace alone) and answers each connection's request head with b"got " and the head,
        then closes. Ready when this returns; the caller kills it."""
        assert self.exec(["sysctl", "-qw", "net.ipv4.tcp_fastopen=3"]).returncode == 0
        server = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, "-c", _FAST_OPEN_ECHO,
                                   address, str(port)], stdout=subprocess.PIPE)
        if server.stdout.readline() != b"ready\n":
            server.kill()
            raise RuntimeError(f"the Fast Open server in {self.name} did not start")
        return server


_FAST_OPEN_ECHO = r"""
import socket, sys
listening = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=512)
listening.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 256)
print("ready", flush=True)
while True:
    conn, _ = listening.accept()
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += conn.recv(4096)
    conn.sendall(b"got " + head)
    conn.close()
"""


def _used_subnet_indexes() -> set[int]:
    used = set()
    for link in json.loads(ip("-j", "-4", "addr", "show")):
        for a in link.get("addr_info", []):
            addr = ipaddress.ip_address(a["local"])
            if addr in TEST_RANGE_V4:
                used.add((int(addr) - int(TEST_RANGE_V4.network_address)) >> 8)
    return used


@contextlib.contextmanager
def veth_netns(peer_addresses: int = 3) -> Iterator[VethNetns]:
    """A namespace whose veth peer has peer_addresses IPv4 and IPv6 addresses."""
    tag = uuid.uuid4().hex[:8]
    name, host_if, peer_if = f"sniproxy-test-{tag}", f"vh{tag}", f"vp{tag}"
    subnets = 1 << (24 - TEST_RANGE_V4.prefixlen)
    try:
        with open(ALLOCATION_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            free = sorted(set(range(subnets)) - _used_subnet_indexes())
            if not free:
                raise RuntimeError(f"no free /24 left in {TEST_RANGE_V4}")
            index = random.choice(free)
            v4 = ipaddress.ip_network((int(TEST_RANGE_V4.network_address) + (index << 8), 24))
            v6 = ipaddress.ip_network(f"{TEST_RANGE_V6.network_address + (index << 64)}/64")
            ns = VethNetns(
                name=name, host_ifname=host_if, peer_ifname=peer_if,
                host_v4=str(v4[1]), peer_v4s=tuple(str(v4[2 + i]) for i in range(peer_addresses)),
                host_v6=str(v6[1]), peer_v6s=tuple(str(v6[2 + i]) for i in range(peer_addresses)),
            )
            ip("netns", "add", name)
            ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name)
            # The host address is claimed before the lock is released.
            ip("addr", "add", f"{ns.host_v4}/24", "dev", host_if)
        ip("addr", "add", f"{ns.host_v6}/64", "dev", host_if, "nodad")
        ip("link", "set", host_if, "up")
        for a in ns.peer_v4s:
            ip("addr", "add", f"{a}/24", "dev", peer_if, netns=name)
        for a in ns.peer_v6s:
            ip("addr", "add", f"{a}/64", "dev", peer_if, "nodad", netns=name)
        ip("link", "set", "lo", "up", netns=name)
        ip("link", "set", peer_if, "up", netns=name)
        yield ns
    finally:
        # Deleting the namespace destroys the peer, and with it the host side.
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
