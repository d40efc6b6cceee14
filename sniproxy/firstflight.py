"""Parse the first bytes a client sends: a TLS ClientHello or an HTTP/1.x request head.

Pure functions, no sockets. The worker calls a parser after every read with all
bytes read so far. The answer is a FirstFlight, NEED_MORE while the bytes are a
valid prefix, NotThisProtocol (route to the listener's fallback) or Malformed
(refuse). A decision, once made, does not change as more bytes arrive.
"""
from __future__ import annotations

import enum
import ipaddress
import re
from typing import Final, NamedTuple

# scripts/setup compiles this module with Cython, typed by firstflight.pxd beside it: the
# index arithmetic below then runs as C. Interpreted, a ClientHello took 8 µs in a warm loop
# and the worker some 25 µs of user time a connection (bench/results/2026-11-29-connrate-floor).
# The interpreter runs the same source where no compiler was at hand (the master says so).
COMPILED: Final = not __file__.endswith(".py")

MAX_CLIENT_HELLO: Final = 64 * 1024  # bytes of handshake message accepted at most
MAX_HTTP_HEAD: Final = 16 * 1024  # request line and headers, including the blank line


class FirstFlight(NamedTuple):   # a tuple: made for every connection, and cheaper than a frozen dataclass
    name: str | None  # usable routing name, or None (then the listener's fallback applies)
    alpn: tuple[str, ...] = ()  # TLS ALPN protocol names, for logs
    name_problem: str = ""  # why name is None: no_sni, no_host, ip_literal, bad_name


class NeedMoreType(enum.Enum):
    NEED_MORE = "NEED_MORE"

    def __repr__(self) -> str:
        return self.value


NEED_MORE: Final = NeedMoreType.NEED_MORE


class NotThisProtocol(Exception):
    """The first bytes cannot start this protocol: route to the fallback."""


class Malformed(Exception):
    """Starts like the protocol but is broken or too large: refuse."""


# --- names -------------------------------------------------------------------

MAX_NAME = 253
MAX_LABEL = 63


def normalize_name(raw: bytes | str) -> tuple[str | None, str]:
    """Return (name, "") for a usable host name, else (None, problem)."""
    if isinstance(raw, str):
        if not raw.isascii():
            return None, "bad_name"
        raw = raw.encode("ascii")
    name = bytes(raw.lower())   # the same object when raw is bytes
    if name.endswith(b"."):
        name = name[:-1]
    if _is_ip_literal(name):
        return None, "ip_literal"
    if len(name) > MAX_NAME or not _is_host_name(name):
        return None, "bad_name"
    return name.decode("ascii"), ""


# The two checks below are loops, not regular expressions: every connection's name
# passes them, and compiled (firstflight.pxd) a loop costs a fraction of a match.

def _is_ip_literal(name: bytes) -> bool:
    if name.startswith(b"[") and name.endswith(b"]"):
        name = name[1:-1]
    if b":" in name:
        try:
            ipaddress.IPv6Address(name.decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            return False
        return True
    return _is_number(name, name.rfind(b".") + 1)


def _is_number(name: bytes, start: int) -> bool:
    """Whether name[start:] is decimal digits, or 0x and hex digits: a last label that
    is a number makes a name an IPv4 address to resolvers and browsers ("127.1",
    "0x7f.1"), never a DNS name."""
    end = len(name)
    hexadecimal = end - start >= 2 and name[start] == 0x30 and name[start + 1] == 0x78   # "0x"
    if hexadecimal:
        start += 2
    elif start == end:
        return False
    for i in range(start, end):
        c = name[i]
        if not (0x30 <= c <= 0x39 or hexadecimal and 0x61 <= c <= 0x66):   # 0-9, a-f
            return False
    return True


def _is_host_name(name: bytes) -> bool:
    """Letters, digits and hyphens, in dot-separated labels of 1 to MAX_LABEL bytes."""
    label = 0
    for i in range(len(name)):
        c = name[i]
        if c == 0x2e:   # "."
            if label == 0:
                return False
            label = 0
        elif 0x61 <= c <= 0x7a or 0x30 <= c <= 0x39 or c == 0x2d:   # a-z, 0-9, "-"
            label += 1
            if label > MAX_LABEL:
                return False
        else:
            return False
    return label > 0


# --- TLS ---------------------------------------------------------------------

_RECORD_HEADER = 5
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_HANDSHAKE_HEADER = 4
_MAX_RECORD_PAYLOAD = 2**14  # RFC 8446 5.1, TLSPlaintext.length
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_TYPE_HOST_NAME = 0


def parse_client_hello(data: bytes) -> FirstFlight | NeedMoreType:
    message = _reassemble_client_hello(data)
    if message is NEED_MORE:
        return NEED_MORE
    return _parse_client_hello_body(message)


def _reassemble_client_hello(data: bytes) -> bytes | NeedMoreType:
    """Join handshake record payloads until they hold the whole ClientHello body."""
    payload = bytearray()
    offset = 0
    while offset < len(data):
        header = data[offset:offset + _RECORD_HEADER]
        _check_record_header(header, first=offset == 0)
        if len(header) < _RECORD_HEADER:
            break
        length = int.from_bytes(header[3:5])
        payload += data[offset + _RECORD_HEADER:offset + _RECORD_HEADER + length]
        offset += _RECORD_HEADER + length
        if payload and payload[0] != _HANDSHAKE_CLIENT_HELLO:   # the first byte decides: no wait
            raise Malformed(f"handshake message type {payload[0]}, not ClientHello")
        if len(payload) >= _HANDSHAKE_HEADER:
            body_length = int.from_bytes(payload[1:4])
            if body_length > MAX_CLIENT_HELLO:
                raise Malformed(f"ClientHello of {body_length} bytes is over {MAX_CLIENT_HELLO}")
            if len(payload) >= _HANDSHAKE_HEADER + body_length:
                return bytes(payload[_HANDSHAKE_HEADER:_HANDSHAKE_HEADER + body_length])
    return NEED_MORE


def _check_record_header(header: bytes, first: bool) -> None:
    """Judge a record header from as many of its bytes as have arrived."""
    # Bytes that cannot start TLS at all go to the fallback; a later record
    # that is not a handshake record breaks a ClientHello already begun. An
    # SSLv2-style hello starts with a length byte with the high bit set.
    error = NotThisProtocol if first else Malformed
    if header[:1] != bytes([_CONTENT_HANDSHAKE]):
        raise error("not a TLS handshake record")
    if header[1:2] not in (b"", b"\x03"):
        raise error("record version is not 3.x")
    if len(header) == _RECORD_HEADER and not 0 < int.from_bytes(header[3:5]) <= _MAX_RECORD_PAYLOAD:
        raise Malformed(f"handshake record of {int.from_bytes(header[3:5])} bytes")


def _vector_end(data: bytes, pos: int, length_size: int, end: int, what: str) -> int:
    """Where the variable-length vector at pos (its length field, then that many
    bytes) ends; it must end by `end`."""
    if pos + length_size > end:
        raise Malformed(f"{what} truncated")
    stop = pos + length_size + (data[pos] if length_size == 1 else data[pos] << 8 | data[pos + 1])
    if stop > end:
        raise Malformed(f"{what} truncated")
    return stop


# The body is read by index arithmetic, not through a reader object: this runs
# for every connection, and a call per field cost more than the reading itself.

def _parse_client_hello_body(body: bytes) -> FirstFlight:
    end = len(body)
    if end < 35:                                  # legacy_version, random, session_id length
        raise Malformed("ClientHello truncated")
    if body[0] != 3:
        raise Malformed("ClientHello version is not 3.x")
    if body[34] > 32:
        raise Malformed("session_id longer than 32 bytes")
    session_end = 35 + body[34]
    if session_end > end:
        raise Malformed("ClientHello truncated")
    suites_end = _vector_end(body, session_end, 2, end, "ClientHello")
    if suites_end == session_end + 2 or (suites_end - session_end) % 2:
        raise Malformed("cipher_suites length")
    compression_end = _vector_end(body, suites_end, 1, end, "ClientHello")
    if compression_end == suites_end + 1:
        raise Malformed("no compression method")
    extensions = {}
    if compression_end < end:
        if _vector_end(body, compression_end, 2, end, "ClientHello") != end:
            raise Malformed("ClientHello has trailing bytes")
        extensions = _extensions(body, compression_end + 2, end)
    sni = extensions.get(_EXT_SERVER_NAME)
    name, problem = _server_name(body, sni[0], sni[1]) if sni else (None, "no_sni")
    alpn = extensions.get(_EXT_ALPN)
    return FirstFlight(name, _alpn(body, alpn[0], alpn[1]) if alpn else (), problem)


def _extensions(body: bytes, pos: int, end: int) -> dict[int, tuple[int, int]]:
    """Where each extension's data starts and ends, by type."""
    extensions: dict[int, tuple[int, int]] = {}
    while pos < end:
        if pos + 4 > end:
            raise Malformed("extensions truncated")
        ext_type = body[pos] << 8 | body[pos + 1]
        if ext_type in extensions:
            raise Malformed(f"duplicate extension {ext_type}")  # RFC 8446 4.2
        start = pos + 4
        pos = start + (body[pos + 2] << 8 | body[pos + 3])
        if pos > end:
            raise Malformed("extensions truncated")
        extensions[ext_type] = (start, pos)
    return extensions


def _server_name(body: bytes, start: int, end: int) -> tuple[str | None, str]:
    if _vector_end(body, start, 2, end, "server_name") != end:
        raise Malformed("server_name has trailing bytes")
    pos = start + 2
    if pos == end:
        raise Malformed("empty server_name_list")
    host_name = None
    while pos < end:
        value_end = _vector_end(body, pos + 1, 2, end, "server_name_list")
        if body[pos] == _NAME_TYPE_HOST_NAME:
            if host_name is not None:
                raise Malformed("two host_name entries")  # RFC 6066 3
            host_name = body[pos + 3:value_end]
        pos = value_end
    if host_name is None:
        return None, "no_sni"
    return normalize_name(host_name)


def _alpn(body: bytes, start: int, end: int) -> tuple[str, ...]:
    if _vector_end(body, start, 2, end, "ALPN") != end:
        raise Malformed("ALPN has trailing bytes")
    pos = start + 2
    if pos == end:
        raise Malformed("empty ALPN list")
    names = []
    while pos < end:
        name_end = _vector_end(body, pos, 1, end, "protocol_name_list")
        if name_end == pos + 1:
            raise Malformed("empty ALPN protocol name")
        names.append(body[pos + 1:name_end].decode("ascii", "backslashreplace"))
        pos = name_end
    return tuple(names)


# --- HTTP/1.x ----------------------------------------------------------------

# RFC 9110 5.6.2 token characters.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Real methods are short; a longer run of token bytes is some other protocol.
_MAX_METHOD = 32
_HTTP1_VERSION = re.compile(rb"HTTP/1\.[0-9]")
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_FIELD_FORBIDDEN = re.compile(rb"[\x00\r\n]")


def parse_http_request(data: bytes) -> FirstFlight | NeedMoreType:
    _check_method(data)
    line_end = data.find(b"\n", 0, MAX_HTTP_HEAD)
    if line_end < 0:
        return _need_more_within(data, MAX_HTTP_HEAD)
    if data[line_end - 1:line_end] != b"\r":
        raise Malformed("request line does not end in CRLF")
    target, version = _parse_request_line(data[:line_end - 1])
    head_end = data.find(b"\r\n\r\n", line_end - 1, MAX_HTTP_HEAD)
    if head_end < 0:
        return _need_more_within(data, MAX_HTTP_HEAD)
    hosts = _host_fields(data[line_end + 1:head_end])
    if len(hosts) > 1:
        raise Malformed("more than one Host header")
    absolute = _ABSOLUTE_FORM.match(target)
    if absolute:
        authority = absolute[1].rpartition(b"@")[2]  # drop userinfo
    elif hosts:
        authority = hosts[0]
    elif version == b"HTTP/1.0":
        return FirstFlight(None, name_problem="no_host")
    else:
        raise Malformed("HTTP/1.1 request without Host")  # RFC 9112 3.2
    name, problem = _name_of_authority(authority)
    return FirstFlight(name, name_problem=problem)


def _need_more_within(data: bytes, limit: int) -> NeedMoreType:
    if len(data) >= limit:
        raise Malformed(f"request head over {limit} bytes")
    return NEED_MORE


def _check_method(data: bytes) -> None:
    space = data.find(b" ", 0, _MAX_METHOD + 1)
    method = data[:space] if space >= 0 else data[:_MAX_METHOD + 1]
    if space == 0 or method.translate(None, _TCHAR):
        raise NotThisProtocol("does not start with an HTTP method")
    if space < 0 and len(method) > _MAX_METHOD:
        raise NotThisProtocol("method too long")


def _parse_request_line(line: bytes) -> tuple[bytes, bytes]:
    parts = line.split(b" ")
    if len(parts) == 3 and parts[2].startswith(b"HTTP/") and not _HTTP1_VERSION.fullmatch(parts[2]):
        raise NotThisProtocol("not HTTP/1.x")
    if len(parts) != 3 or not parts[1] or not _HTTP1_VERSION.fullmatch(parts[2]):
        raise Malformed("bad request line")
    target, version = parts[1], parts[2]
    if any(byte < 0x21 or byte == 0x7F for byte in target):
        raise Malformed("control character in request target")
    return target, version


def _host_fields(fields: bytes) -> list[bytes]:
    hosts = []
    for line in fields.split(b"\r\n") if fields else ():
        name, colon, value = line.partition(b":")
        # Rejects obsolete line folding and whitespace before the colon (RFC 9112 5).
        if not colon or not name or name.translate(None, _TCHAR) or _FIELD_FORBIDDEN.search(value):
            raise Malformed("bad header line")
        if name.lower() == b"host":
            hosts.append(value.strip(b" \t"))
    return hosts


def _name_of_authority(authority: bytes) -> tuple[str | None, str]:
    if not authority:
        return None, "no_host"
    host_end = authority.find(b"]") + 1 if authority.startswith(b"[") else 0
    colon = authority.find(b":", host_end)
    host, port = (authority, b"") if colon < 0 else (authority[:colon], authority[colon + 1:])
    if port and not port.isdigit():
        return None, "bad_name"
    return normalize_name(host)
