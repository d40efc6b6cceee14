"""The source filter: the [access] allow/deny lists, checked at accept (XDP, where
attached, applies the same rules earlier). Not to be confused with the access log."""
from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


class SourceFilter:
    """Deny wins; a non-empty allow list admits only its members."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()):
        self.allow = parse_networks(allow)
        self.deny = parse_networks(deny)

    def allows(self, ip: str) -> bool:
        if not self.allow and not self.deny:
            return True
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
        # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d.
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.deny):
            return False
        return not self.allow or any(addr in net for net in self.allow)
