"""A bounded fuzz of the live proxy at the socket level.

Thousands of mutated first flights go through the real master: TLS ClientHellos
built from the captured hellos with test_firstflight's field-aware decomposer and
composer (names, ALPN, extension types, order and count, head fields, length
fields, record splits), and HTTP request heads; each is sent in random TCP
segments, some with tiny pauses. Generation is seeded (SNIPROXY_FUZZ_SEED), so a
failure names a flight that the same seed makes again.

What reaches a backend is recorded by the backend itself, byte for byte, and is
judged twice: by the parser (what the proxy must have decided) and by a reading
independent of it (test_firstflight's decomposer for TLS, the RFC 9112 rules here
for HTTP). The generator also knows, for most flights, what the answer must be
without asking the parser, so a broken parser fails this test even when the test
imports the same broken copy.

Two bugs the fuzz met have tests of their own at the end: ALPN names that forged
access log lines, and a client_hello deadline that fired early after a long
event-loop iteration.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import random
import re
import socket
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from harness import free_port, serve_in_threads, stop_serving, wait_until
from test_firstflight import (
    CURL_HTTP,
    EXT_PADDING,
    HELLOS,
    IPERF3_COOKIE,
    LDH_NAME,
    NUMERIC_LABEL,
    Hello,
    Piece,
    alpn_names,
    alpn_piece,
    as_records,
    decompose,
    handshake_of,
    http_head,
    in_records,
    mutate,
    sni_entries,
    sni_piece,
    vector,
    with_extension,
)
from test_proxy import make_config, stats

from sniproxy.firstflight import (
    NEED_MORE,
    Malformed,
    NotThisProtocol,
    parse_client_hello,
    parse_http_request,
)

CLIENT_HELLO = 1.0           # timeouts.client_hello
CONCURRENCY = 32
SEED = int(os.environ.get("SNIPROXY_FUZZ_SEED", "20251127"))
N_TLS, N_HTTP = 2800, 1200
TIMEOUT_SHARE = 0.07         # incomplete flights each hold a client for client_hello: keep them few
# Incomplete flights that may close before client_hello, because the worker arms the
# deadline from the event loop's cached clock, stale after a long iteration (see
# test_client_hello_deadline_counts_from_the_start_after_a_busy_loop_iteration).
# They must still be refused as client_hello_timeout. Set to 0 once that bug is fixed.
STALE_CLOCK_TOLERANCE = 0.0
# A loaded machine stalls the workers now and then (seen here: about 1 s, at load average
# 18 on 2 CPUs): this share of connections may miss a time bound, as long as the proxy
# closes them within LATE_GRACE more. One never closed is a failure, always.
LATE_TOLERANCE = 0.01
LATE_GRACE = 3.0
AT_ONCE = "handoff_bytes = 0\nhandoff_after = 0.0\n"   # relayed pairs go to the kernel right after connect

EXACT_NAMES = ("curl.example.test", "openssl.example.test", "tls12.example.test", "python.example.test")
WILD_SUFFIX = ".example.test"   # route "*.example.test": any subdomain, not the apex
MAX_RECORD = 2**14
MAX_HTTP_HEAD = 16 * 1024

TLS_ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])
HTTP_400 = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HTTP_421 = b"HTTP/1.1 421 Misdirected Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
ANSWERS = {("tls", "no_route"): TLS_ALERT_UNRECOGNIZED_NAME, ("tls", "no_name"): TLS_ALERT_UNRECOGNIZED_NAME,
           ("http", "no_route"): HTTP_421, ("http", "no_name"): HTTP_421, ("http", "malformed"): HTTP_400}
REASONS = ("relayed", "malformed", "not_protocol", "no_name", "no_route", "client_hello_timeout")
ACK = re.compile(rb"SNIFUZZ-ACK (\S+) (\S+)\n")


# --- names: a verdict independent of the parser (test_firstflight's regular expressions) ---


def name_verdict(raw: bytes) -> tuple[str, str | None]:
    """("relayed", "exact" | "wild") for a name a route takes, ("no_route", None) for a
    host name no route takes, ("no_name", None) for what is no host name: not LDH
    labels of 1 to 63 bytes, over 253 bytes, or an IP literal (a numeric last label)."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if len(name) > 253 or not LDH_NAME.fullmatch(name) or NUMERIC_LABEL.fullmatch(name.rpartition(b".")[2]):
        return "no_name", None
    text = name.decode()
    if text in EXACT_NAMES:
        return "relayed", "exact"
    if text.endswith(WILD_SUFFIX):
        return "relayed", "wild"
    return "no_route", None


def authority_verdict(authority: bytes) -> tuple[str, str | None]:
    """An HTTP authority (host[:port]): a port, if any, must be digits."""
    if not authority:
        return "no_name", None
    host_end = authority.find(b"]") + 1 if authority.startswith(b"[") else 0
    host, colon, port = authority[host_end:].partition(b":")
    host = authority[:host_end] + host
    if colon and port and not port.isdigit():
        return "no_name", None
    return name_verdict(host)


LDH = string.ascii_lowercase * 3 + string.ascii_uppercase + string.digits + "-"


def label(rng: random.Random, lo: int = 1, hi: int = 10) -> str:
    return "".join(rng.choice(LDH) for _ in range(rng.randint(lo, hi)))


def spelled(rng: random.Random, name: str) -> bytes:
    """Mixed case, and sometimes the trailing dot of a fully qualified name."""
    name = "".join(c.upper() if rng.random() < 0.3 else c for c in name)
    return (name + ("." if rng.random() < 0.2 else "")).encode()


def long_name(rng: random.Random, total: int, suffix: str = WILD_SUFFIX) -> bytes:
    """A name of exactly `total` bytes that ends in suffix, in labels of up to 63."""
    labels, left = [], total - len(suffix)
    while left > 0:
        size = min(63, left) if left != 65 else 62   # never leave a 1-byte tail for the dot alone
        labels.append("a" * size)
        left -= size + 1
    name = ".".join(labels)[: total - len(suffix)] + suffix
    return name.encode()


def bad_names(rng: random.Random) -> list[bytes]:
    sub = label(rng)
    return [
        b"*.example.test", f"{sub}_x.example.test".encode(), b"a..example.test", b".x.example.test",
        b"x.example.test..", b"", b".", b"a" * 64 + b".example.test", long_name(rng, 254),
        b"curl.example.test\x00", b"curl.example.test\x00.evil.test", f"{sub} .example.test".encode(),
        "b\u00fccher.example.test".encode(), b"curl.example.test:443", b"curl.example.test/x",
        f"{sub}.example.test.1".encode(), b"x.example.test.0x1f", b"\xff\xfe", b"curl.example.test\n",
        b"10.0.0.1", b"127.1", b"0x7f.1", b"1.2.3.4.", b"::1", b"[2001:db8::1]", b"2001:db8::7", b"[::1",
    ]


def gen_name(rng: random.Random) -> bytes:
    """A host name to send: routed (exact or wildcard), unrouted, or no name at all."""
    k = rng.random()
    if k < 0.16:
        return spelled(rng, rng.choice(EXACT_NAMES))
    if k < 0.48:
        return spelled(rng, ".".join(label(rng) for _ in range(rng.randint(1, 3))) + WILD_SUFFIX)
    if k < 0.51:
        return long_name(rng, rng.choice([200, 252, 253]))
    if k < 0.62:
        return spelled(rng, rng.choice([
            "example.test", f"{label(rng)}.example.test.evil", f"{label(rng)}example.test", "example.testx",
            f"{label(rng)}.other.test", f"{label(rng)}.example.tes", f"curl.example.test-{label(rng)}",
            f"{label(rng)}.{label(rng)}"]))
    if k < 0.88:
        return rng.choice(bad_names(rng))
    return rng.randbytes(rng.randint(0, 40))


# --- TLS flights ------------------------------------------------------------------

FIXTURE_HELLOS = {name: decompose(handshake_of(data)) for name, data in sorted(HELLOS.items())}


@dataclass
class Flight:
    protocol: str                  # "tls" | "http"
    data: bytes
    what: str                      # how it was made, for failure messages
    intent: tuple[str, str | None] | None = None   # (reason, route label) known without the parser
    cuts: tuple[int, ...] = ()     # TCP segment boundaries
    pause: float = 0.0             # seconds between segments


def sni_host_names(hello: Hello) -> list[bytes] | None:
    """The host_name entries of the hello's SNI (None without the extension)."""
    exts = dict(hello.extensions)
    if 0 not in exts:
        return None
    return [value for name_type, value in sni_entries(exts[0].data) if name_type == 0]


def hello_verdict(hello: Hello) -> tuple[str, str | None]:
    hosts = sni_host_names(hello)
    return name_verdict(hosts[0]) if hosts else ("no_name", None)


def record_cuts(rng: random.Random, size: int) -> list[int]:
    """Where to split the handshake into records: at random, often not at all; never a
    record over 2**14 bytes."""
    k = rng.random()
    cuts = [] if k < 0.4 else list(range(1, size)) if k < 0.42 else \
        [rng.randrange(1, max(2, size)) for _ in range(rng.randint(1, 6))]
    return sorted(set(cuts) | set(range(MAX_RECORD, size, MAX_RECORD)))


def valid_hello(rng: random.Random) -> tuple[Hello, str]:
    """A captured hello with well-formed changes: SNI, ALPN, unknown extensions, order, head fields."""
    fixture = rng.choice(sorted(FIXTURE_HELLOS))
    hello = FIXTURE_HELLOS[fixture]
    exts = dict(hello.extensions)
    what = [fixture]
    k = rng.random()
    if k < 0.72:
        name = gen_name(rng)
        exts[0] = sni_piece([(0, name)])
        what.append(f"sni={name!r}")
    elif k < 0.77:
        exts.pop(0, None)
        what.append("no sni")
    elif k < 0.85:   # other name types around at most one host_name
        entries = [(rng.choice([1, 2, 255]), rng.randbytes(rng.randint(0, 12))) for _ in range(rng.randint(1, 2))]
        if rng.random() < 0.6:
            entries.insert(rng.randint(0, len(entries)), (0, gen_name(rng)))
        exts[0] = sni_piece(entries)
        what.append(f"sni entries={entries!r}")
    if rng.random() < 0.3:
        names = [bytes(rng.randint(0x21, 0x7E) for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.1:   # any bytes at all, control characters included
            names[0] = rng.randbytes(rng.randint(1, 12)) + rng.choice([b"", b"\n", b"\r\n", b"\x1b[2J", b"\x00"])
        exts[16] = alpn_piece(names)
        what.append(f"alpn={names!r}")
    elif rng.random() < 0.1:
        exts.pop(16, None)
    if rng.random() < 0.3:
        for _ in range(rng.randint(1, 3)):
            ext_type = rng.choice([EXT_PADDING, 0xFE0D, 0xFF01, 17513, rng.randrange(0x10000)])
            if ext_type not in exts and ext_type not in (0, 16):
                exts[ext_type] = Piece(rng.randbytes(rng.randint(0, 40)))
        what.append("unknown extensions")
    if rng.random() < 0.03:
        exts[EXT_PADDING] = Piece(bytes(rng.randint(2000, 30000)))
        what.append(f"padding {len(exts[EXT_PADDING].data)}")
    items = list(exts.items())
    if rng.random() < 0.5:
        rng.shuffle(items)
        what.append("reordered")
    hello = replace(hello, extensions=tuple(items))
    if rng.random() < 0.3:
        hello = replace(hello, version=bytes([3, rng.randrange(256)]), random=rng.randbytes(32),
                        session_id=rng.randbytes(rng.randint(0, 32)),
                        cipher_suites=rng.randbytes(2 * rng.randint(1, 20)),
                        compression=rng.randbytes(rng.randint(1, 4)))
        what.append("head fields")
    return hello, " ".join(what)


def broken_hello(rng: random.Random, hello: Hello) -> tuple[Hello | Piece, str]:
    """One change that the parser must refuse as malformed, whatever the name."""
    exts = list(hello.extensions)
    kind = rng.choice(["duplicate", "two host names", "empty sni list", "empty alpn list", "empty alpn name",
                       "sni trailing bytes", "alpn trailing bytes",
                       "session_id", "cipher_suites", "compression", "msg_type", "version", "sized length"])
    if kind == "duplicate":
        ext_type, data = rng.choice(exts)
        exts.insert(rng.randint(0, len(exts)), (ext_type, data))
    elif kind == "two host names":
        exts = [(t, d) for t, d in exts if t != 0]
        exts.insert(rng.randint(0, len(exts)), (0, sni_piece([(0, gen_name(rng)), (0, gen_name(rng))])))
    elif kind == "empty sni list":
        exts = [(t, d) for t, d in exts if t != 0] + [(0, vector("server_name_list", 2, b""))]
    elif kind == "empty alpn list":
        exts = [(t, d) for t, d in exts if t != 16] + [(16, vector("alpn_list", 2, b""))]
    elif kind in ("sni trailing bytes", "alpn trailing bytes"):   # bytes after a whole list, in its extension
        ext_type = 0 if kind.startswith("sni") else 16
        whole_list = sni_piece([(0, gen_name(rng))]) if ext_type == 0 else alpn_piece([b"h2"])
        extra = rng.choice([b"\x00", b"\x00\x00", b"\x00\x00\x03abc", rng.randbytes(rng.randint(1, 9))])
        exts = [(t, d) for t, d in exts if t != ext_type]
        exts.insert(rng.randint(0, len(exts)), (ext_type, Piece(whole_list.data + extra)))
    elif kind == "empty alpn name":
        exts = [(t, d) for t, d in exts if t != 16] + [(16, alpn_piece([b"h2", b""][::rng.choice([1, -1])]))]
    elif kind == "session_id":
        return replace(hello, session_id=rng.randbytes(rng.randint(33, 40))), kind
    elif kind == "cipher_suites":
        return replace(hello, cipher_suites=rng.randbytes(rng.choice([0, 1, 3, 7, 41]))), kind
    elif kind == "compression":
        return replace(hello, compression=b""), kind
    elif kind == "msg_type":
        return replace(hello, msg_type=rng.choice([0, 2, 11, 16, 255])), kind
    elif kind == "version":
        return replace(hello, version=bytes([rng.choice([0, 2, 4, 255]), rng.randrange(256)])), kind
    else:   # a wrong length in the SNI or ALPN lists of a hello with one LDH host name (see test_firstflight)
        exts = [(t, d) for t, d in exts if t != 0]
        exts.insert(rng.randint(0, len(exts)), (0, sni_piece([(0, spelled(rng, label(rng) + WILD_SUFFIX))])))
        if 16 in dict(exts) and any(b < 0x21 or b > 0x7E for n in alpn_names(dict(exts)[16].data) for b in n):
            exts = [(t, d) for t, d in exts if t != 16]
        piece = replace(hello, extensions=tuple(exts)).encoded()
        fields = [i for i, (_, _, what) in enumerate(piece.lengths)
                  if what in ("server_name_list", "server_name", "alpn_list")]
        return wrong_length(rng, piece, rng.choice(fields)), kind
    return replace(hello, extensions=tuple(exts)), kind


def wrong_length(rng: random.Random, piece: Piece, index: int) -> Piece:
    """The piece with length field `index` set to a wrong value (near the true one, 0, the top, or any)."""
    at, size, _ = piece.lengths[index]
    true, top = int.from_bytes(piece.data[at:at + size]), 256**size - 1
    value = rng.choice([true - 1, true + 1, true - 2, true + 2, true - 3, true + 3, 0, top, rng.randint(0, top)])
    value = value if value != true and 0 <= value <= top else true ^ 1
    return Piece(piece.with_length(index, value), piece.lengths)


TRAILERS = [bytes.fromhex("140303000101"), bytes.fromhex("1703030005") + b"early", b"\x16", b"x" * 40]


def tls_flight(rng: random.Random) -> Flight:
    k = rng.random()
    if k < 0.05:    # an unchanged capture, in random records
        fixture = rng.choice(sorted(HELLOS))
        hello = FIXTURE_HELLOS[fixture]
        handshake = hello.encoded()
        return Flight("tls", in_records(handshake, record_cuts(rng, len(handshake.data))).data,
                      f"{fixture} as captured", hello_verdict(hello))
    if k < 0.09:    # not TLS at all
        options = [CURL_HTTP, IPERF3_COOKIE, b"SSH-2.0-OpenSSH_9.2\r\n", b"\x80\x2e\x01\x03\x01" + bytes(40),
                   bytes([rng.choice([0, 0x14, 0x15, 0x17, 0x80, 0xFF])]) + rng.randbytes(rng.randint(0, 300)),
                   bytes([0x16, rng.choice([0, 2, 4, 0x16, 0xFF])]) + HELLOS["curl"][2:]]
        return Flight("tls", rng.choice(options), "not tls", ("not_protocol", None))
    hello, what = valid_hello(rng)
    verdict = hello_verdict(hello)
    if k < 0.52:
        handshake = hello.encoded()
        records = in_records(handshake, record_cuts(rng, len(handshake.data)))
        flight = records.data
        if rng.random() < 0.1:
            flight += rng.choice(TRAILERS)
            what += " with bytes after the hello"
        if rng.random() < 0.1:   # the client stops short: wait for the rest until client_hello
            return Flight("tls", flight[:rng.randrange(len(records.data))], what + " cut short",
                          ("client_hello_timeout", None))
        return Flight("tls", flight, what, verdict)
    if k < 0.64:
        broken, kind = broken_hello(rng, hello)
        handshake = broken if isinstance(broken, Piece) else broken.encoded()
        return Flight("tls", in_records(handshake, record_cuts(rng, len(handshake.data))).data,
                      f"{what}; broken: {kind}", ("malformed", None))
    if k < 0.68:    # a record that breaks the hello begun before it
        handshake = hello.encoded()
        cut = rng.randrange(1, len(handshake.data))
        records = in_records(handshake, [cut])
        second = 5 + cut
        change = rng.choice(["type", "version", "empty", "oversized"])
        data = bytearray(records.data)
        if change == "type":
            data[second] = rng.choice([0x14, 0x15, 0x17, 0x00])
        elif change == "version":
            data[second + 1] = rng.choice([0, 2, 4])
        else:
            data[second + 3:second + 5] = (0 if change == "empty" else rng.randint(MAX_RECORD + 1, 0xFFFF)).to_bytes(2)
        return Flight("tls", bytes(data), f"{what}; second record: {change}", ("malformed", None))
    # Field-level and byte-level mutants: only the parser knows.
    exts = list(hello.extensions)
    for _ in range(rng.randint(0, 2)):
        change = rng.choice(["type", "sni bytes", "alpn bytes", "drop", "copy", "add"])
        i = rng.randrange(len(exts)) if exts else 0
        if change == "type" and exts:
            exts[i] = (rng.choice([0, 16, EXT_PADDING, 51, rng.randrange(0x10000), rng.choice(exts)[0]]), exts[i][1])
        elif change in ("sni bytes", "alpn bytes"):
            exts.insert(i, (0 if change == "sni bytes" else 16, Piece(rng.randbytes(rng.randint(0, 30)))))
        elif change == "drop" and exts:
            exts.pop(i)
        elif change == "copy" and exts:
            exts.insert(rng.randint(0, len(exts)), exts[i])
        else:
            exts.insert(i, (rng.randrange(0x10000), Piece(rng.randbytes(rng.randint(0, 64)))))
        what += f"; {change}"
    handshake = replace(hello, extensions=tuple(exts)).encoded()
    records = in_records(handshake, record_cuts(rng, len(handshake.data)))
    if rng.random() < 0.6 and records.lengths:
        index = rng.randrange(len(records.lengths))
        records = wrong_length(rng, records, index)
        what += f"; wrong {records.lengths[index][2]} length"
    data = records.data
    if rng.random() < 0.4:
        ops = [rng.choice([("flip", rng.randrange(600), rng.randrange(8)), ("truncate", rng.randrange(600)),
                           ("insert", rng.randrange(600), rng.randbytes(rng.randint(1, 8))),
                           ("delete", rng.randrange(600), rng.randint(1, 8))]) for _ in range(rng.randint(1, 3))]
        data = mutate(data, ops)
        what += f"; bytes {ops!r}"
    return Flight("tls", data, what)


# --- HTTP flights -----------------------------------------------------------------

HTTP_SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*!$&'()+,;=~%")


def http_name(rng: random.Random) -> bytes:
    """A name that stays one token in a Host value and in an absolute-form authority."""
    while True:
        name = gen_name(rng)
        if set(name) <= HTTP_SAFE:
            return name


def valid_http(rng: random.Random) -> tuple[bytes, int, str, tuple[str, str | None]]:
    """(request, length of its head, what, verdict) of a request head that parses."""
    method = rng.choice(["GET"] * 5 + ["POST", "HEAD", "OPTIONS", "PUT", "DELETE", "get", "PROPFIND", "M-SEARCH"])
    version = rng.choice(["HTTP/1.1"] * 4 + ["HTTP/1.0"])
    name = http_name(rng)
    port = rng.choice([b""] * 4 + [b":80", b":8080", b":" + str(rng.randrange(65536)).encode(), b":", b":http"])
    fields = [b"User-Agent: curl/7.88.1", b"Accept: */*"]
    fields += [f"X-Fuzz-{i}: {label(rng, 0, 30)}".encode() for i in range(rng.randint(0, 4))]
    rng.shuffle(fields)
    host_field_name = rng.choice([b"Host", b"host", b"HOST", b"hOsT"])
    pad = rng.choice([b"", b" ", b"  ", b"\t", b" \t"])
    form = rng.random()
    if form < 0.75:
        target = rng.choice([b"/", b"/index.html", b"/a/b?c=d&e", b"*", b"/" + label(rng).encode()])
        authority = name + port
        if rng.random() < 0.95:
            fields.insert(rng.randint(0, len(fields)), host_field_name + b":" + pad + authority + pad[::-1])
            verdict = authority_verdict(authority)
        else:
            verdict = ("no_name", None) if version == "HTTP/1.0" else ("malformed", None)
    else:
        userinfo = rng.choice([b"", b"user@", b"user:pw@"])
        scheme = rng.choice([b"http", b"HTTP", b"https", b"ws"])
        target = scheme + b"://" + userinfo + name + port + rng.choice([b"", b"/", b"/x?y", b"?q", b"#f"])
        if rng.random() < 0.5:
            fields.insert(rng.randint(0, len(fields)), host_field_name + b": " + http_name(rng))
        verdict = authority_verdict(name + port)
    head = http_head(f"{method} {target.decode('latin-1')} {version}", *(f.decode("latin-1") for f in fields))
    body = b""
    if method == "POST":
        body = rng.randbytes(rng.randint(0, 200))
        head = head[:-2] + f"Content-Length: {len(body)}\r\n\r\n".encode()
    what = f"{method} {target!r} {version} host={name + port!r}"
    return head + body, len(head), what, verdict


def http_flight(rng: random.Random) -> Flight:
    k = rng.random()
    if k < 0.05:
        return Flight("http", CURL_HTTP, "curl_http.bin", ("relayed", "exact"))
    if k < 0.10:
        options = [HELLOS["curl"], IPERF3_COOKIE, b"\x00\x01\x02", b" GET / HTTP/1.1\r\nHost: a.example.test\r\n\r\n",
                   b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n",
                   b"A" * 40 + b" / HTTP/1.1\r\nHost: a.example.test\r\n\r\n",
                   b"GE\x01T / HTTP/1.1\r\nHost: a.example.test\r\n\r\n",
                   b"GET / HTTP/1.x\r\nHost: a.example.test\r\n\r\n"]
        return Flight("http", rng.choice(options), "not http", ("not_protocol", None))
    request, head_size, what, verdict = valid_http(rng)
    if k < 0.58:
        if rng.random() < 0.08:
            return Flight("http", request[:rng.randrange(head_size)], what + " cut short",
                          ("client_hello_timeout", None))
        return Flight("http", request, what, verdict)
    if k < 0.72:
        lines = request[:head_size - 4].split(b"\r\n")
        kind = rng.choice(["two hosts", "no host", "fold", "space before colon", "no colon", "nul", "bare lf",
                           "double space", "extra token", "lower-case version", "control in target", "too large"])
        if kind == "two hosts":
            lines[1:1] = [b"Host: a.example.test", b"host: " + http_name(rng)]
        elif kind == "no host":
            lines = [lines[0].rsplit(b" ", 1)[0] + b" HTTP/1.1"] + [f for f in lines[1:]
                                                                    if not f.lower().startswith(b"host:")]
            if re.match(rb"\S+ [A-Za-z][A-Za-z0-9+.-]*://", lines[0]):
                lines[0] = lines[0].split(b" ")[0] + b" / HTTP/1.1"
        elif kind == "fold":
            lines.insert(rng.randint(2, len(lines)), rng.choice([b" folded", b"\tfolded"]))
        elif kind == "space before colon":
            lines.insert(rng.randint(1, len(lines)), b"X-Bad : value")
        elif kind == "no colon":
            lines.insert(rng.randint(1, len(lines)), b"no colon here")
        elif kind == "nul":
            lines.insert(rng.randint(1, len(lines)), b"X-Nul: a\x00b")
        elif kind == "bare lf":   # one line ends in LF alone (the request line has fields after it)
            at = rng.randrange(len(lines) - 1)
            lines[at:at + 2] = [lines[at] + b"\n" + lines[at + 1]]
        elif kind == "double space":
            lines[0] = lines[0].replace(b" ", b"  ", 1)
        elif kind == "extra token":
            lines[0] += b" extra"
        elif kind == "lower-case version":
            lines[0] = lines[0][:-8] + lines[0][-8:].lower()
        elif kind == "control in target":
            method, target, version = lines[0].split(b" ")
            lines[0] = b" ".join([method, target + rng.choice([b"\x01", b"\x7f", b"\x1b[0m"]), version])
        else:
            lines += [b"X-Filler-%d: %s" % (i, b"v" * 90) for i in range(MAX_HTTP_HEAD // 100 + 1)]
        return Flight("http", b"\r\n".join(lines) + b"\r\n\r\n", f"{what}; broken: {kind}", ("malformed", None))
    # Byte-level mutants: only the parser knows.
    data = request
    ops = [rng.choice([("flip", rng.randrange(len(data)), rng.randrange(8)), ("truncate", rng.randrange(len(data))),
                       ("insert", rng.randrange(len(data)), rng.choice([b"\r\n", b"\n", b" ", b":", b"\x00",
                                                                        rng.randbytes(rng.randint(1, 8))])),
                       ("delete", rng.randrange(len(data)), rng.randint(1, 8))]) for _ in range(rng.randint(1, 3))]
    return Flight("http", mutate(data, ops), f"{what}; bytes {ops!r}")


# --- the corpus -------------------------------------------------------------------

def parser_verdict(protocol: str, data: bytes) -> tuple[str, str | None]:
    """What the proxy must do with these bytes, by the parser (and the routes)."""
    parse = parse_client_hello if protocol == "tls" else parse_http_request
    try:
        flight = parse(data)
    except NotThisProtocol:
        return "not_protocol", None
    except Malformed:
        return "malformed", None
    except Exception as e:  # noqa: BLE001 - a parser that crashes is a finding, not the end of the run
        return "parser error", repr(e)
    if flight is NEED_MORE:
        return "client_hello_timeout", None
    if flight.name is None:
        return "no_name", None
    if flight.name in EXACT_NAMES:
        return "relayed", "exact"
    if flight.name.endswith(WILD_SUFFIX):
        return "relayed", "wild"
    return "no_route", None


def segments(rng: random.Random, flight: Flight) -> Flight:
    """Random TCP segment boundaries, and for some flights a pause of a few ms between them."""
    size = len(flight.data)
    k = rng.random()
    if k < 0.3 or size < 2:
        cuts = []
    elif k < 0.4:
        cuts = [1]                            # the first byte alone
    else:
        cuts = sorted({rng.randrange(1, size) for _ in range(rng.randint(1, 6))})
    pause = rng.choice([0.001, 0.002, 0.004]) if cuts and rng.random() < 0.35 else 0.0
    return replace(flight, cuts=tuple(cuts), pause=pause)


@functools.lru_cache(maxsize=2)
def corpus(seed: int = SEED, n_tls: int = N_TLS, n_http: int = N_HTTP) -> list[Flight]:
    """The flights, the same for the same seed. Incomplete flights are capped at
    TIMEOUT_SHARE: each holds its client for client_hello."""
    rng = random.Random(seed)
    flights = []
    for count, make in ((n_tls, tls_flight), (n_http, http_flight)):
        cap, incomplete, made = int(count * TIMEOUT_SHARE), 0, 0
        while made < count:
            flight = make(rng)
            if parser_verdict(flight.protocol, flight.data)[0] == "client_hello_timeout":
                if incomplete >= cap:
                    continue
                incomplete += 1
            flights.append(segments(rng, flight))
            made += 1
    rng.shuffle(flights)
    return flights


# --- what reached a backend, read without the parser --------------------------------

def independent_tls_verdict(data: bytes) -> tuple[str, str | None]:
    """A first flight that reached a backend, read with test_firstflight's decomposer:
    handshake records (3.x, 1 to 2**14 bytes) that hold a whole ClientHello, every
    vector in it whole, and the rules RFC 8446 and 6066 add. AssertionError if not."""
    handshake, offset = b"", 0
    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4]):
        header = data[offset:offset + 5]
        assert len(header) == 5 and header[0] == 22 and header[1] == 3, f"record header {header.hex()} at {offset}"
        length = int.from_bytes(header[3:5])
        assert 0 < length <= MAX_RECORD, f"record of {length} bytes"
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        assert handshake[0] == 1 and int.from_bytes(handshake[1:4]) <= 64 * 1024, "not a ClientHello, or too large"
    hello = decompose(handshake[:4 + int.from_bytes(handshake[1:4])])
    assert hello.version[0] == 3 and len(hello.session_id) <= 32, "head fields"
    assert hello.cipher_suites and len(hello.cipher_suites) % 2 == 0 and hello.compression, "head vectors"
    types = [t for t, _ in hello.extensions]
    assert len(types) == len(set(types)), f"duplicate extension in {types}"
    exts = dict(hello.extensions)
    if 16 in exts:
        names = alpn_names(exts[16].data)
        assert names and all(names), "empty ALPN list or name"
    assert 0 in exts, "no SNI"
    entries = sni_entries(exts[0].data)
    hosts = [value for name_type, value in entries if name_type == 0]
    assert entries and len(hosts) == 1, f"SNI entries {entries!r}"
    return name_verdict(hosts[0])


_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(%s) ([^\x00-\x20\x7f]+) HTTP/1\.([0-9])" % _TOKEN)
_FIELD = re.compile(rb"(%s):([^\x00\r\n]*)" % _TOKEN)


def independent_http_verdict(data: bytes) -> tuple[str, str | None]:
    """An HTTP/1.x request head (RFC 9112), read without the parser. AssertionError if it is not one."""
    end = data.find(b"\r\n\r\n")
    assert 0 <= end <= MAX_HTTP_HEAD - 4, "no head within the limit"
    request_line, *fields = data[:end].split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(request_line)
    assert line and len(line[1]) <= 32, f"request line {request_line!r}"
    hosts = []
    for field in fields:
        match = _FIELD.fullmatch(field)
        assert match, f"header line {field!r}"
        if match[1].lower() == b"host":
            hosts.append(match[2].strip(b" \t"))
    assert len(hosts) <= 1, "two Host fields"
    absolute = re.match(rb"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)", line[2])
    if absolute:
        return authority_verdict(absolute[1].rpartition(b"@")[2])
    assert hosts or line[3] == b"0", "HTTP/1.1 without Host"
    return authority_verdict(hosts[0]) if hosts else ("no_name", None)


# --- backends that record -------------------------------------------------------------

class Recorder:
    """A loopback backend that records what each connection carries: its first bytes,
    and every byte up to the proxy's half-close. It answers the first bytes with
    "SNIFUZZ-ACK <label> <id>", the half-close with the length and sha256 of all it
    got, then closes."""

    def __init__(self, label: str):
        self.label = label
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[dict] = []
        self.lock = threading.Lock()
        serve_in_threads(self.sock, self._handle)

    def _handle(self, conn: socket.socket) -> None:
        with self.lock:
            record = {"id": f"{self.label}-{len(self.conns)}", "first": b"", "data": b"", "ended": False,
                      "error": None}
            self.conns.append(record)
        try:
            with conn:
                conn.settimeout(15)
                record["first"] = data = conn.recv(1 << 20)
                if not data:
                    return
                conn.sendall(b"SNIFUZZ-ACK %s %s\n" % (self.label.encode(), record["id"].encode()))
                while chunk := conn.recv(1 << 20):
                    data += chunk
                record["data"], record["ended"] = data, True
                conn.sendall(b"SNIFUZZ-DONE %d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode()))
        except OSError as e:
            record["error"] = repr(e)

    def close(self) -> None:
        stop_serving(self.sock)


# --- clients -------------------------------------------------------------------------

class Grace:
    """How many clients may wait LATE_GRACE past their time bound: a broken proxy that
    never closes a connection then costs the run little more than a working one."""

    def __init__(self, count: int):
        self.count, self.lock = count, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.count -= 1
            return self.count >= 0


def send_flight(port: int, flight: Flight, grace: Grace) -> dict:
    """Send the flight in its segments, then read until the proxy closes, waiting
    client_hello + 1 s for each read (and, for a few clients, LATE_GRACE more); on the
    backend's ACK, half-close, so that the backend answers with what it got."""
    result = {"received": b"", "reset": False, "timed_out": False, "late": False, "send_error": None,
              "t_ack": None}
    # Before the connect: the proxy's deadline cannot start earlier. Taken after it, a
    # client thread that waited its turn between the two saw a timeout close "early".
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result["client_port"] = s.getsockname()[1]
        bounds = [0, *flight.cuts, len(flight.data)]
        try:
            for i in range(len(bounds) - 1):
                s.sendall(flight.data[bounds[i]:bounds[i + 1]])
                if flight.pause and i < len(bounds) - 2:
                    time.sleep(flight.pause)
        except OSError as e:        # refused while the rest was on its way
            result["send_error"] = repr(e)
        sent = time.monotonic()
        s.settimeout(CLIENT_HELLO + 1.0)
        received, shut = bytearray(), False
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                result["reset"] = True
                break
            except TimeoutError:
                if not result["late"] and grace.take():
                    result["late"] = True
                    s.settimeout(LATE_GRACE)
                    continue
                result["timed_out"] = True
                break
            if not chunk:
                break
            received += chunk
            if not shut and ACK.match(received):
                result["t_ack"] = time.monotonic() - start
                shut = True
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass                # reset meanwhile: the next recv says so
        result["t_end"], result["after_send"] = time.monotonic() - start, time.monotonic() - sent
        result["received"] = bytes(received)
    return result


def judge(flight: Flight, expected: tuple[str, str | None], result: dict) -> list[str]:
    """What is wrong with how the proxy treated this one connection."""
    reason, route = expected
    problems = []
    received = result["received"]
    if result["timed_out"]:
        problems.append(f"never closed: not within client_hello + 1 s of the last byte"
                        f"{' + ' + str(LATE_GRACE) + ' s' if result['late'] else ''} (got {received[:80]!r})")
    elif result["late"]:
        problems.append(f"late: not closed within client_hello + 1 s of the last byte, but after "
                        f"{result['after_send']:.2f}s")
    if reason == "relayed":
        ack = ACK.match(received)
        done = b"SNIFUZZ-DONE %d %s\n" % (len(flight.data), hashlib.sha256(flight.data).hexdigest().encode())
        if not ack:
            problems.append(f"not relayed: got {received[:80]!r} reset={result['reset']}")
        elif ack[1].decode() != f"{flight.protocol}-{route}":
            problems.append(f"relayed to {ack[1].decode()}, not {flight.protocol}-{route}")
        elif received[ack.end():] != done:
            problems.append(f"the backend got other bytes: {received[ack.end():]!r} != {done!r}")
        elif result["t_ack"] >= CLIENT_HELLO:
            problems.append(f"late: relayed only after {result['t_ack']:.2f}s")
        return problems
    if b"SNIFUZZ" in received:
        problems.append(f"refused flight ({reason}) reached a backend: {received[:80]!r}")
    answer = ANSWERS.get((flight.protocol, reason), b"")
    if not (answer.startswith(received) if result["reset"] else received == answer):
        problems.append(f"answer {received[:80]!r} (reset={result['reset']}), expected {answer!r} for {reason}")
    if reason == "client_hello_timeout":
        if result["t_end"] < CLIENT_HELLO * 0.9:
            problems.append(f"early: incomplete flight closed after {result['t_end']:.2f}s, before client_hello")
    elif result["t_end"] >= CLIENT_HELLO:
        problems.append(f"late: complete flight ({reason}) closed only after {result['t_end']:.2f}s")
    return problems


# --- the access log -----------------------------------------------------------------

_LOG_LINE = re.compile(r"\S+ client=127\.0\.0\.1:(\d+) listener=127\.0\.0\.1:(\d+) .* relay=(\S+) outcome=(\S+)")


def log_outcomes(path: Path, skip: int) -> tuple[dict, list[str], collections.Counter]:
    """{(listener port, client port): [reason, ...]} from the access log after its first
    `skip` bytes, the lines it could not read, and how often each relay is named."""
    outcomes, unread = collections.defaultdict(list), []
    text = path.read_bytes()[skip:].decode("latin-1")
    # Spaces inside a field are escaped, so " relay=" starts the field even in a line split by a forged ALPN.
    relays = collections.Counter(re.findall(r" relay=(\S+) ", text))
    for line in text.split("\n"):
        if not line:
            continue
        m = _LOG_LINE.fullmatch(line)
        if not m:
            unread.append(line)
            continue
        outcome = m[4]
        reason = outcome.split(":")[1] if outcome.startswith("refused:") else \
            "error" if outcome.startswith("error") else outcome if outcome == "closed_early" else "relayed"
        outcomes[int(m[2]), int(m[1])].append(reason)
    return outcomes, unread, relays


def control_alpn(data: bytes) -> bool:
    """Does the hello carry an ALPN name with a control character (see the test at the end)?"""
    try:
        flight = parse_client_hello(data)
    except Exception:  # noqa: BLE001 - refused, or a broken parser: parser_verdict reports it
        return False
    return flight is not NEED_MORE and any(c < " " or c == "\x7f" for name in flight.alpn for c in name)


# --- the checks ---------------------------------------------------------------------

def ended(c: dict) -> int:
    """Connections the counters say ended: relayed (by any relay), refused, closed early or failed."""
    return sum(v for k, v in c.items() if k.startswith(("relayed_", "refused_"))) + c["closed_early"] + c["errors"]


def relayed(c: dict) -> int:
    return sum(v for k, v in c.items() if k.startswith("relayed_"))


def check_clients(flights, expected, results) -> tuple[list[str], dict[str, list[str]]]:
    """Each client's view (see judge): its problems, and the time bounds missed, by
    kind: "late" (tolerated for LATE_TOLERANCE of the connections, a loaded machine)
    and "early" (closed before client_hello: none tolerated)."""
    problems, missed = [], {"late": [], "early": []}
    for i, (f, verdict, result) in enumerate(zip(flights, expected, results)):
        for problem in judge(f, verdict, result):
            kind = problem.partition(":")[0]
            missed.get(kind, problems).append(
                f"#{i} {f.protocol} {verdict[0]} [{f.what}] cuts={f.cuts} pause={f.pause}: "
                f"{problem}; flight {f.data[:100].hex()}")
    if len(missed["late"]) > LATE_TOLERANCE * len(flights):
        problems += missed["late"]
    if len(missed["early"]) > STALE_CLOCK_TOLERANCE * sum(v[0] == "client_hello_timeout" for v in expected):
        problems += missed["early"]
    return problems, missed


def check_backends(flights, expected, results, recorders: dict) -> list[str]:
    """What reached the backends: routable flights only, each once, whole, to its route's
    backend, and well formed when read without the parser."""
    problems = []
    try:
        wait_until(lambda: all(c["ended"] or c["error"] for r in recorders.values() for c in r.conns),
                   what="the backends to see every half-close")
    except TimeoutError as e:
        problems.append(str(e))
    conns = [dict(c, label=r.label) for r in recorders.values() for c in r.conns]
    for c in conns:
        protocol, route = c["label"].split("-")
        if c["error"] or not c["ended"]:
            problems.append(f"backend {c['id']}: {c['error'] or 'no half-close'}; first {c['first'][:100]!r}")
            continue
        if parser_verdict(protocol, c["data"]) != ("relayed", route):
            problems.append(f"backend {c['id']} got bytes that parse to {parser_verdict(protocol, c['data'])}: "
                            f"{c['data'][:100]!r}")
        if parser_verdict(protocol, c["first"]) not in (("relayed", route), ("client_hello_timeout", None)):
            problems.append(f"backend {c['id']}'s first bytes parse to {parser_verdict(protocol, c['first'])}")
        try:
            verdict = (independent_tls_verdict if protocol == "tls" else independent_http_verdict)(c["data"])
        except AssertionError as e:
            verdict = ("not well formed", str(e))
        if verdict != ("relayed", route):
            problems.append(f"backend {c['id']} got a flight that is, read without the parser, {verdict}: "
                            f"{c['data'][:100]!r}")
    routable = [(f"{f.protocol}-{v[1]}", f.data) for f, v in zip(flights, expected) if v[0] == "relayed"]
    by_backend, by_flight = collections.Counter((c["label"], c["data"]) for c in conns), collections.Counter(routable)
    if by_backend != by_flight:
        problems.append(f"backends got {sum((by_backend - by_flight).values())} flights none was to get, "
                        f"and missed {sum((by_flight - by_backend).values())}")
    if len(conns) != len(routable):
        problems.append(f"{len(conns)} backend connections for {len(routable)} routable flights")
    acked = collections.Counter(m[2].decode() for r in results if (m := ACK.match(r["received"])))
    if set(acked) != {c["id"] for c in conns} or max(acked.values(), default=1) != 1:
        problems.append("the clients' ACKs do not name each backend connection once")
    return problems


def check_counters(p, base: dict, expected, mode: str) -> tuple[list[str], dict]:
    """The workers' counters, once every connection ended: accepted == relayed +
    refused_* + closed_early + errors, each reason as often as expected, no errors."""
    problems, n = [], len(expected)
    try:
        counters = wait_until(lambda: (c := stats(p))["accepted"] - base["accepted"] >= n
                              and ended(c) == c["accepted"] and c, timeout=15, what="the counters to settle")
    except TimeoutError:
        counters = stats(p)
        problems.append(f"the counters do not add up: {counters}")
    delta = {k: counters[k] - base.get(k, 0) for k in counters}
    want = collections.Counter(v[0] for v in expected)
    got = {"relayed": relayed(delta), **{r: delta[f"refused_{r}"] for r in REASONS if r != "relayed"}}
    if delta["accepted"] != n:
        problems.append(f"accepted {delta['accepted']} for {n} connections")
    if got != {r: want[r] for r in REASONS}:
        problems.append(f"counters {got} != expected {dict(want)}")
    for key in ("errors", "closed_early", "fallback", "refused_access_denied", "refused_connect_failed"):
        if delta[key]:
            problems.append(f"{key} = {delta[key]}")
    if mode == "off" and relayed(delta) != delta["relayed_userspace"]:
        problems.append(f"relayed other than in userspace with bpf off: {delta}")
    if mode == "require" and not delta["relayed_kernel"]:
        problems.append("nothing relayed by the kernel")   # how many: a race with each half-close
    return problems, delta


def check_access_log(access_log: Path, skip: int, flights, expected, results, ports: dict,
                     delta: dict) -> tuple[list[str], int]:
    """One line per connection with its outcome, keyed by client port (as multisets: a
    port may serve two clients of the run); and the number of hellos whose ALPN holds
    control characters, whose lines may be split (see the test at the end)."""
    problems = []
    outcomes, unread, relays = log_outcomes(access_log, skip)
    want, optional = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    forged = 0
    for f, v, r in zip(flights, expected, results):
        key = ports[f.protocol], r["client_port"]
        if f.protocol == "tls" and control_alpn(f.data):
            forged += 1
            optional[key][v[0]] += 1
        else:
            want[key][v[0]] += 1
    wrong = []
    for key in set(outcomes) | set(want):
        got = collections.Counter(outcomes.get(key, []))
        if want[key] - got or (got - want[key]) - optional[key]:
            wrong.append((key, dict(got), dict(want[key])))
    if wrong:
        problems.append(f"{len(wrong)} connections logged otherwise than expected, e.g. {wrong[:5]}")
    for kind, count in relays.items():
        if kind != "-" and count != delta[f"relayed_{kind}"]:
            problems.append(f"{count} log lines say relay={kind}, the counters {delta[f'relayed_{kind}']}")
    if unread and not forged:
        problems.append(f"unreadable access log lines: {unread[:5]}")
    return problems, forged


def percentiles(results, expected, reasons, key) -> list[float]:
    values = sorted(r[key] or 0 for r, v in zip(results, expected) if v[0] in reasons) or [0]
    return [round(values[int(q * (len(values) - 1))], 3) for q in (0.5, 0.9, 0.99, 1)]


def fuzz_config(tls_port: int, http_port: int, recorders: dict, mode: str, pin_path: str | None,
                access_log: Path) -> str:
    tls = [(name, recorders["tls-exact"].address) for name in EXACT_NAMES] + \
        [("*" + WILD_SUFFIX, recorders["tls-wild"].address)]
    http = [(name, recorders["http-exact"].address) for name in EXACT_NAMES] + \
        [("*" + WILD_SUFFIX, recorders["http-wild"].address)]
    extra = (f'\n[timeouts]\nclient_hello = {CLIENT_HELLO}\n\n[log]\naccess = "{access_log}"\n\n'
             f'[[listener]]\naddress = "127.0.0.1:{http_port}"\nprotocol = "http"\ntable = "http"\n\n'
             + "".join(f'[[table.http]]\nmatch = "{m}"\nbackend = "{b}"\n' for m, b in http))
    return make_config(tls_port, tls, mode=mode, pin_path=pin_path, workers=2,
                       bpf=AT_ONCE if mode == "require" else "", extra=extra)


# --- the tests ---------------------------------------------------------------------------

def test_corpus_reaches_every_outcome_and_agrees_with_the_generator():
    """Guards the fuzzer, and the parser with it, without a proxy: the generator's own
    verdicts (known without the parser) agree with the parser's, and the corpus
    reaches every outcome on both listeners in useful numbers."""
    flights = corpus()
    assert len(flights) == N_TLS + N_HTTP >= 3000
    seen = collections.Counter()
    disagree = []
    for i, f in enumerate(flights):
        verdict = parser_verdict(f.protocol, f.data)
        seen[f.protocol, verdict[0]] += 1
        if f.intent is not None and f.intent != verdict:
            disagree.append(f"#{i} {f.protocol} {f.what}: generator {f.intent}, parser {verdict}; {f.data[:120]!r}")
    assert not disagree, f"{len(disagree)} disagree:\n" + "\n".join(disagree[:20])
    known = sum(f.intent is not None for f in flights)
    assert known > len(flights) / 2, known
    for protocol, count in (("tls", N_TLS), ("http", N_HTTP)):
        for reason in REASONS:
            assert seen[protocol, reason] >= count // 50, (protocol, reason, seen)
        assert seen[protocol, "relayed"] > count / 4, seen
        assert seen[protocol, "client_hello_timeout"] <= count * TIMEOUT_SHARE, seen
    labels = collections.Counter((f.protocol, *parser_verdict(f.protocol, f.data)) for f in flights)
    for protocol in ("tls", "http"):
        assert labels[protocol, "relayed", "exact"] and labels[protocol, "relayed", "wild"], labels


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_live_fuzz(mode, proxy, request, tmp_path):
    """N_TLS + N_HTTP mutated first flights, CONCURRENCY at a time, through the real
    master (bpf.mode `mode`; "require" hands every relayed pair to the kernel at once),
    each judged by its client, by the backends, by the counters and by the access log."""
    pin_path = request.getfixturevalue("pin_path") if mode == "require" else None
    flights = corpus()
    expected = [parser_verdict(f.protocol, f.data) for f in flights]
    # The generator knows most answers without the parser: a parser that disagrees is broken
    # (the proxy runs the same one, so the live checks below judge against it; the backends'
    # bytes are also read without it).
    problems = {"generator": [f"#{i} {f.what}: the generator says {f.intent}, the parser {expected[i]}"
                              for i, f in enumerate(flights) if f.intent is not None and f.intent != expected[i]]}
    recorders = {name: Recorder(name) for name in ("tls-exact", "tls-wild", "http-exact", "http-wild")}
    try:
        ports = {"tls": free_port(), "http": free_port()}
        access_log = tmp_path / "access.log"
        p = proxy(fuzz_config(ports["tls"], ports["http"], recorders, mode, pin_path, access_log),
                  wait_ports=tuple(ports.values()))
        # The harness's port probes: counted, and logged, before the run.
        try:
            base = wait_until(lambda: (c := stats(p))["accepted"] >= 2 and ended(c) == c["accepted"] and c,
                              what="the port probes to end")
            probe_log = wait_until(lambda: access_log.exists() and access_log.read_bytes().count(b"\n")
                                   == base["accepted"] and access_log.stat().st_size, what="the probes' log lines")
        except TimeoutError:
            pytest.fail(f"the port probes did not end: {stats(p)}")
        assert base["accepted"] == base["closed_early"], f"a probe was not one: {base}"
        workers = p.worker_pids()
        assert len(workers) == 2

        started = time.monotonic()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            grace = Grace(int(LATE_TOLERANCE * len(flights)) + 1)
            results = list(pool.map(lambda f: send_flight(ports[f.protocol], f, grace), flights))
        elapsed = time.monotonic() - started

        problems["clients"], missed = check_clients(flights, expected, results)
        problems["backends"] = check_backends(flights, expected, results, recorders)
        problems["counters"], delta = check_counters(p, base, expected, mode)
        problems["access log"], forged = check_access_log(access_log, probe_log, flights, expected, results,
                                                          ports, delta)
        output = p.output()
        problems["workers"] = [f"workers {workers} became {p.worker_pids()}"] * (p.worker_pids() != workers) + \
            [f"{bad!r} in the master's log:\n{output[-3000:]}" for bad in ("Traceback", "cannot boot") if bad in output]

        print(f"\nlive fuzz, bpf.mode {mode}: {len(flights)} connections in {elapsed:.1f}s; outcomes "
              f"{dict(collections.Counter(v[0] for v in expected))}; relayed by {[(k, v) for k, v in delta.items() if k.startswith('relayed_') and v]}; "
              f"control-character ALPN {forged}; late {len(missed['late'])}, closed before client_hello "
              f"{len(missed['early'])}\n"
              f"seconds at percentiles 50/90/99/100: ACK {percentiles(results, expected, ['relayed'], 't_ack')}, "
              f"refusal {percentiles(results, expected, set(REASONS) - {'relayed', 'client_hello_timeout'}, 't_end')}, "
              f"client_hello timeout {percentiles(results, expected, ['client_hello_timeout'], 't_end')}")
        problems = {check: found for check, found in problems.items() if found}
        assert not problems, f"problems (seed {SEED}): " + ", ".join(f"{k} {len(v)}" for k, v in problems.items()) + \
            "".join(f"\n{check}:\n  " + "\n  ".join(found[:8]) for check, found in problems.items())
    finally:
        for r in recorders.values():
            r.close()


def test_alpn_control_characters_cannot_forge_access_log_lines(proxy, tmp_path):
    """One connection, one access log line: whatever a client puts in its hello."""
    access_log = tmp_path / "access.log"
    port = free_port()
    proxy(make_config(port, [("example.com", "127.0.0.1:9")], workers=1, extra=f'[log]\naccess = "{access_log}"\n'),
          wait_ports=(port,))
    forged = b"h2\n2099-01-01T00:00:00 client=192.0.2.1:1 listener=x name=forged outcome=done\x1b[2J"
    hello = as_records(with_extension(handshake_of(HELLOS["curl"]), 16, alpn_piece([forged]).data))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(hello)
        assert s.recv(100) == TLS_ALERT_UNRECOGNIZED_NAME     # curl.example.test: no route
    wait_until(lambda: access_log.exists() and b"outcome=refused:no_route" in access_log.read_bytes(),
               what="this client's access log record")
    lines = access_log.read_bytes().decode("latin-1").splitlines()
    assert len(lines) == 2, lines                             # the harness's probe, and this client
    assert all(_LOG_LINE.fullmatch(line) for line in lines), lines
    assert not any(c < " " or c == "\x7f" for line in lines for c in line), lines


def test_client_hello_deadline_counts_from_the_start_after_a_busy_loop_iteration(tmp_path):
    """A worker starts each connection from the acceptor's io callback, after whatever
    else that loop iteration did (other accepts, parses, sends, registrations): however
    long that took, the connection gets its whole client_hello."""
    import _socket

    import gevent
    from harness import hub_wait_until
    from test_connection import Rig

    from sniproxy.connection import Connection

    rig = Rig(tmp_path, [("curl.example.test", "127.0.0.1:9")], extra=f"[timeouts]\nclient_hello = {CLIENT_HELLO}\n")
    client = socket.create_connection(rig.listening.getsockname(), timeout=5)
    wake, waker = socket.socketpair()
    try:
        client.sendall(bytes.fromhex("1603010200"))      # a record header, then silence
        fd, peer = rig.listening._accept()
        conn = Connection(rig.ctx, rig.lc, _socket.socket(rig.listening.family, socket.SOCK_STREAM, 0, fd), peer)
        watcher, started = gevent.get_hub().loop.io(wake.fileno(), 1), []

        def accept_callback():                            # as worker._accept_all runs: an io watcher's callback
            watcher.stop()
            time.sleep(0.6)                               # the rest of a busy iteration, before this accept
            started.append(time.monotonic())
            conn.start()
        watcher.start(accept_callback)
        waker.send(b"!")
        hub_wait_until(lambda: conn.ended, 5, "the connection to end")
        lasted = time.monotonic() - started[0]
        assert "outcome=refused:client_hello_timeout" in rig.log_path.read_text()
        assert lasted >= CLIENT_HELLO * 0.95, f"closed {lasted:.3f}s after it started; client_hello is {CLIENT_HELLO}s"
    finally:
        for s in (client, wake, waker, rig.listening):
            s.close()
