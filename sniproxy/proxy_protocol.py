"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the header that tells a
backend the client's address, written before the first flight so that neither
relay ever needs to know of it.
"""
from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21                     # version 2, command PROXY
_V2_TCP4, _V2_TCP6 = 0x11, 0x21      # address family and transport
PP2_TYPE_AUTHORITY = 0x02            # the host name the client asked for (SNI or Host)


def header(version: str, source: tuple, destination: tuple, authority: str | None = None) -> bytes:
    """The header for a TCP connection from source to destination ((ip, port, ...) as
    socket addresses are); v2 also carries the requested name (PP2_TYPE_AUTHORITY)."""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:   # an IPv4 client on a dual-stack socket: say it in IPv6
        src, dst = _v6(src), _v6(dst)
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {source[1]} {destination[1]}\r\n".encode()
    addresses = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    if authority:
        name = authority.encode()
        addresses += struct.pack("!BH", PP2_TYPE_AUTHORITY, len(name)) + name
    family = _V2_TCP4 if src.version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, family, len(addresses)) + addresses


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _v6(ip) -> ipaddress.IPv6Address:
    return ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")
