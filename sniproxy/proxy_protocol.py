"""The PROXY protocol (HAProxy's spec, versions 1 and 2): the header that carries
a client's address across a proxy. `header` writes one to a backend before the
first flight, so neither relay ever needs to know of it; `parse` reads one that an
L4 balancer sent ahead of the client's first flight (listener accept_proxy).
"""
from __future__ import annotations

import ipaddress
import struct
from typing import NamedTuple

from .firstflight import NEED_MORE, Malformed, NeedMoreType

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
_V1_MAX = 107                        # the longest v1 line, CRLF included
_V2_LOCAL, _V2_PROXY = 0x20, 0x21    # version 2, command LOCAL (the balancer's own) or PROXY
_V2_ADDRESSES = {0x11: 12, 0x21: 36}  # TCP over IPv4, over IPv6: the address block's size
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


class Received(NamedTuple):
    length: int                          # of the header, in bytes
    source: tuple[str, int] | None       # the client's address; None: the sender's own (LOCAL, UNKNOWN)


def parse(data: bytes) -> Received | NeedMoreType:
    """A PROXY header, v1 or v2 (told apart by their signatures), at the start of data."""
    for signature, parse_version in ((V1_SIGNATURE, _parse_v1), (V2_SIGNATURE, _parse_v2)):
        if data[:len(signature)] == signature[:len(data)]:
            return NEED_MORE if len(data) < len(signature) else parse_version(data)
    raise Malformed("no PROXY protocol header")


def _parse_v1(data: bytes) -> Received | NeedMoreType:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise Malformed("PROXY v1 line too long")
        return NEED_MORE
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return Received(end + 2, None)
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise Malformed("bad PROXY v1 line")
    try:
        source = ipaddress.ip_address(fields[2])
        ipaddress.ip_address(fields[3])
        ports = [int(p) for p in fields[4:6] if p.isdigit() and (p == "0" or not p.startswith("0"))]
    except ValueError:
        raise Malformed("bad address in PROXY v1 line") from None
    if len(ports) != 2 or not all(0 <= p < 65536 for p in ports) or source.version != (4 if fields[1] == "TCP4" else 6):
        raise Malformed("bad PROXY v1 line")
    return Received(end + 2, (str(source), ports[0]))


def _parse_v2(data: bytes) -> Received | NeedMoreType:
    if len(data) < 16:
        return NEED_MORE
    command, family, length = data[12], data[13], int.from_bytes(data[14:16], "big")
    if command not in (_V2_LOCAL, _V2_PROXY):
        raise Malformed(f"PROXY v2 version/command {command:#x}")
    if len(data) < 16 + length:
        return NEED_MORE
    if command == _V2_LOCAL or family not in _V2_ADDRESSES:   # a health check, or not TCP
        return Received(16 + length, None)
    size = _V2_ADDRESSES[family]
    if length < size:
        raise Malformed("PROXY v2 address block truncated")
    half = (size - 4) // 2
    source = ipaddress.ip_address(data[16:16 + half])
    return Received(16 + length, (str(source), int.from_bytes(data[16 + 2 * half:18 + 2 * half], "big")))
