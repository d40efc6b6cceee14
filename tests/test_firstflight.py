"""The first-flight parsers, on real captured first flights and on fuzzed bytes."""
from __future__ import annotations

import collections
import importlib.util
import ipaddress
import itertools
import pathlib
import re
import struct
import sys
from dataclasses import dataclass, replace

import pytest
from hypothesis import Phase, event, given, settings
from hypothesis import strategies as st

from sniproxy import firstflight
from sniproxy.firstflight import (
    MAX_CLIENT_HELLO,
    MAX_HTTP_HEAD,
    NEED_MORE,
    FirstFlight,
    Malformed,
    NotThisProtocol,
    normalize_name,
    parse_client_hello,
    parse_http_request,
)

FLIGHTS_DIR = pathlib.Path(__file__).parent / "fixtures" / "hellos"
H2_H1 = ("h2", "http/1.1")
EXPECTED_HELLOS = {
    "curl": FirstFlight("curl.example.test", H2_H1),
    "openssl": FirstFlight("openssl.example.test", H2_H1),  # sent as "OpenSSL.Example.Test."
    "openssl_tls12": FirstFlight("tls12.example.test", ("http/1.1",)),
    "openssl_noservername": FirstFlight(None, (), "no_sni"),
    "python_ssl": FirstFlight("python.example.test", H2_H1),
}
HELLOS = {name: (FLIGHTS_DIR / f"{name}.bin").read_bytes() for name in EXPECTED_HELLOS}
CURL_HTTP = (FLIGHTS_DIR / "curl_http.bin").read_bytes()
IPERF3_COOKIE = (FLIGHTS_DIR / "iperf3.bin").read_bytes()

EXT_PADDING = 21
EXT_KEY_SHARE = 51
X25519MLKEM768 = 0x11EC
FUZZ = settings(max_examples=300, deadline=2000)


# --- a ClientHello decomposer and composer, independent of the parser ---------

@dataclass(frozen=True)
class Piece:
    """Encoded bytes that remember where their length fields are, so a fuzzer can set one wrong."""
    data: bytes = b""
    lengths: tuple[tuple[int, int, str], ...] = ()  # (offset, size, what) of each length field

    def __add__(self, other: Piece | bytes) -> Piece:
        other = as_piece(other)
        moved = tuple((len(self.data) + at, size, what) for at, size, what in other.lengths)
        return Piece(self.data + other.data, self.lengths + moved)

    def cut(self, start: int, end: int) -> Piece:
        inside = tuple((at - start, size, what) for at, size, what in self.lengths if start <= at <= end - size)
        return Piece(self.data[start:end], inside)

    def with_length(self, index: int, value: int) -> bytes:
        at, size, _ = self.lengths[index]
        return self.data[:at] + value.to_bytes(size) + self.data[at + size:]


def as_piece(data: Piece | bytes) -> Piece:
    return data if isinstance(data, Piece) else Piece(bytes(data))


def vector(what: str, size: int, inner: Piece | bytes) -> Piece:
    inner = as_piece(inner)
    return Piece(len(inner.data).to_bytes(size), ((0, size, what),)) + inner


def joined(pieces) -> Piece:
    return sum(pieces, Piece())


def take(data: bytes, pos: int, size: int) -> tuple[bytes, int]:
    """The vector at pos (a size-byte length, then that many bytes) and where it ends."""
    end = pos + size + int.from_bytes(data[pos:pos + size])
    assert end <= len(data), "vector overruns its container"
    return data[pos + size:end], end


def whole(data: bytes, size: int) -> bytes:
    """The vector that must fill data exactly."""
    value, end = take(data, 0, size)
    assert end == len(data), "bytes after the vector"
    return value


def items(data: bytes, size: int, tag: int = 0) -> list[tuple[int, bytes]]:
    """Back-to-back (tag of `tag` bytes, vector) items: extensions, server names, ALPN names."""
    found, pos = [], 0
    while pos < len(data):
        value, end = take(data, pos + tag, size)
        found.append((int.from_bytes(data[pos:pos + tag]), value))
        pos = end
    return found


def sni_entries(data: bytes) -> list[tuple[int, bytes]]:
    return items(whole(data, 2), 2, tag=1)


def alpn_names(data: bytes) -> list[bytes]:
    return [name for _, name in items(whole(data, 2), 1)]


def sni_piece(entries) -> Piece:
    return vector("server_name_list", 2, joined(
        Piece(bytes([name_type])) + vector("server_name", 2, value) for name_type, value in entries))


def alpn_piece(names) -> Piece:
    return vector("alpn_list", 2, joined(vector("protocol_name", 1, name) for name in names))


def extension_piece(ext_type: int, data: bytes) -> Piece:
    """Extension data, with the length fields inside SNI and ALPN marked."""
    piece = {0: lambda: sni_piece(sni_entries(data)), 16: lambda: alpn_piece(alpn_names(data))}.get(
        ext_type, lambda: Piece(data))()
    assert piece.data == data
    return piece


@dataclass(frozen=True)
class Hello:
    version: bytes
    random: bytes
    session_id: bytes
    cipher_suites: bytes
    compression: bytes
    extensions: tuple[tuple[int, Piece], ...]
    msg_type: int = 1

    def head(self) -> Piece:
        """The fields before the extensions."""
        return (Piece(self.version + self.random) + vector("session_id", 1, self.session_id)
                + vector("cipher_suites", 2, self.cipher_suites) + vector("compression", 1, self.compression))

    def encoded(self) -> Piece:
        return client_hello(self.head(), self.extensions, self.msg_type)


def client_hello(head: Piece | bytes, extensions, msg_type: int = 1) -> Piece:
    block = joined(Piece(ext_type.to_bytes(2)) + vector("extension", 2, data) for ext_type, data in extensions)
    return Piece(bytes([msg_type])) + vector("handshake", 3, as_piece(head) + vector("extensions", 2, block))


def decompose(handshake: bytes) -> Hello:
    """The fields of a well-formed ClientHello handshake message."""
    assert handshake[0] == 1
    body, fields, pos = whole(handshake[1:], 3), [], 34
    for size in (1, 2, 1, 2):  # session_id, cipher_suites, compression_methods, extensions
        field, pos = take(body, pos, size)
        fields.append(field)
    assert pos == len(body)
    extensions = tuple((ext_type, extension_piece(ext_type, data)) for ext_type, data in items(fields[3], 2, tag=2))
    return Hello(body[:2], body[2:34], *fields[:3], extensions)


def expected_flight(hello: Hello) -> FirstFlight:
    """The oracle: what a hello whose host name (if any) and ALPN names are valid parses to."""
    data = {ext_type: piece.data for ext_type, piece in hello.extensions}
    alpn = tuple(name.decode() for name in alpn_names(data[16])) if 16 in data else ()
    hosts = [value for name_type, value in sni_entries(data[0]) if name_type == 0] if 0 in data else []
    if not hosts:
        return FirstFlight(None, alpn, "no_sni")
    return FirstFlight(hosts[0].decode().lower().removesuffix("."), alpn)


def handshake_of(flight: bytes) -> bytes:
    """The concatenated payloads of the handshake records in a first flight."""
    payload, offset = b"", 0
    while offset < len(flight):
        assert flight[offset] == 22
        record, offset = take(flight, offset + 3, 2)
        payload += record
    return payload


def in_records(handshake: Piece | bytes, cuts) -> Piece:
    """Handshake bytes in handshake records, split at the cut points."""
    handshake = as_piece(handshake)
    size = len(handshake.data)
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < size}), size]
    return joined(Piece(b"\x16\x03\x01") + vector("record", 2, handshake.cut(start, end))
                  for start, end in itertools.pairwise(bounds))


def as_records(handshake: bytes, cuts=None, size: int = 2**14) -> bytes:
    """Wrap handshake bytes in records, split at the given cut points or every `size` bytes."""
    return in_records(handshake, range(size, len(handshake), size) if cuts is None else cuts).data


def split_client_hello(handshake: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """(fields before the extensions, [(type, data)]) of a ClientHello handshake message."""
    hello = decompose(handshake)
    return hello.head().data, [(ext_type, piece.data) for ext_type, piece in hello.extensions]


def build_client_hello(head: bytes, extensions: list[tuple[int, bytes]]) -> bytes:
    return client_hello(head, extensions).data


def with_extension(handshake: bytes, ext_type: int, data: bytes) -> bytes:
    """Add an extension, or replace the one of that type."""
    head, extensions = split_client_hello(handshake)
    extensions = [(t, d) for t, d in extensions if t != ext_type]
    return build_client_hello(head, [(ext_type, data), *extensions])


def sni_extension(*entries: tuple[int, bytes]) -> bytes:
    return sni_piece(entries).data


def hello_with_sni(*entries: tuple[int, bytes]) -> bytes:
    return as_records(with_extension(handshake_of(HELLOS["curl"]), 0, sni_extension(*entries)))


def inflated_key_share(handshake: bytes, share_size: int) -> bytes:
    head, extensions = split_client_hello(handshake)
    inflated = []
    for ext_type, data in extensions:
        if ext_type == EXT_KEY_SHARE:
            shares = data[2:] + struct.pack("!HH", X25519MLKEM768, share_size) + bytes(share_size)
            data = struct.pack("!H", len(shares)) + shares
        inflated.append((ext_type, data))
    return build_client_hello(head, inflated)


# --- helpers for the properties -----------------------------------------------

def outcome(parse, data: bytes):
    """What a parser decides: NEED_MORE, a FirstFlight, or the class of its refusal."""
    try:
        return parse(data)
    except (NotThisProtocol, Malformed) as error:
        assert str(error), "refusals name what is wrong"
        return type(error)


def assert_fed_in_pieces(parse, data: bytes, cuts, expected) -> None:
    """Every strict prefix ending at a cut needs more; the whole gives `expected`."""
    for cut in cuts:
        if 0 <= cut < len(data):
            assert parse(data[:cut]) is NEED_MORE, cut
    assert outcome(parse, data) == expected


def assert_decision_is_final(parse, data: bytes, cut: int) -> None:
    """Once a prefix is decided, more bytes never change the decision."""
    early = outcome(parse, data[:cut])
    if early is not NEED_MORE:
        assert outcome(parse, data) == early


fixture_names = pytest.mark.parametrize("fixture", sorted(EXPECTED_HELLOS))
cut_points = st.lists(st.integers(min_value=0, max_value=1000), max_size=20)


# --- TLS: real hellos -----------------------------------------------------------

@fixture_names
def test_real_hello_gives_name_and_alpn(fixture):
    assert parse_client_hello(HELLOS[fixture]) == EXPECTED_HELLOS[fixture]


def test_bytearray_input_is_accepted():
    # A reader may accumulate into a bytearray.
    assert parse_client_hello(bytearray(HELLOS["curl"])) == EXPECTED_HELLOS["curl"]
    assert parse_http_request(bytearray(CURL_HTTP)) == FirstFlight("curl.example.test")


@fixture_names
def test_real_hello_one_byte_at_a_time(fixture):
    flight = HELLOS[fixture]
    assert_fed_in_pieces(parse_client_hello, flight, range(len(flight)), EXPECTED_HELLOS[fixture])


@fixture_names
@settings(max_examples=50, deadline=2000)
@given(cuts=cut_points)
def test_real_hello_in_random_segments(fixture, cuts):
    assert_fed_in_pieces(parse_client_hello, HELLOS[fixture], cuts, EXPECTED_HELLOS[fixture])


@fixture_names
def test_bytes_after_the_hello_are_ignored(fixture):
    early_data = struct.pack("!BHH", 23, 0x0303, 3) + b"abc"
    assert parse_client_hello(HELLOS[fixture] + early_data) == EXPECTED_HELLOS[fixture]


@fixture_names
def test_handshake_bytes_after_the_hello_in_its_record_are_ignored(fixture):
    flight = as_records(handshake_of(HELLOS[fixture]) + b"\x0b\x00\x00\x00")
    assert parse_client_hello(flight) == EXPECTED_HELLOS[fixture]


@fixture_names
@pytest.mark.parametrize("records", [2, 3, 7, "one byte each"])
def test_real_hello_split_across_records(fixture, records):
    handshake = handshake_of(HELLOS[fixture])
    size = 1 if records == "one byte each" else -(-len(handshake) // records)
    flight = as_records(handshake, size=size)
    assert flight.count(b"\x16\x03\x01") >= (len(handshake) if size == 1 else records)
    assert parse_client_hello(flight) == EXPECTED_HELLOS[fixture]


@fixture_names
@settings(max_examples=50, deadline=2000)
@given(record_cuts=cut_points, segment_cuts=cut_points)
def test_real_hello_in_random_records_and_segments(fixture, record_cuts, segment_cuts):
    flight = as_records(handshake_of(HELLOS[fixture]), record_cuts)
    assert_fed_in_pieces(parse_client_hello, flight, segment_cuts, EXPECTED_HELLOS[fixture])


@pytest.mark.parametrize("fixture", [name for name in sorted(HELLOS) if name != "openssl_tls12"])
def test_hello_with_post_quantum_sized_key_share(fixture):
    handshake = inflated_key_share(handshake_of(HELLOS[fixture]), share_size=20_000)
    assert len(handshake) > 20_000
    flight = as_records(handshake)
    assert flight.count(b"\x16\x03\x01") == 2
    assert_fed_in_pieces(parse_client_hello, flight, range(0, len(flight), 997), EXPECTED_HELLOS[fixture])


@fixture_names
def test_hello_with_large_padding(fixture):
    handshake = with_extension(handshake_of(HELLOS[fixture]), EXT_PADDING, bytes(40_000))
    flight = as_records(handshake, size=5000)
    assert_fed_in_pieces(parse_client_hello, flight, range(0, len(flight), 1999), EXPECTED_HELLOS[fixture])


def test_hello_size_limit():
    handshake = handshake_of(HELLOS["curl"])
    head_size = len(with_extension(handshake, EXT_PADDING, b"")) - 4

    def hello_of_size(body_size: int) -> bytes:
        return as_records(with_extension(handshake, EXT_PADDING, bytes(body_size - head_size)))

    assert parse_client_hello(hello_of_size(MAX_CLIENT_HELLO)) == EXPECTED_HELLOS["curl"]
    too_big = hello_of_size(MAX_CLIENT_HELLO + 1)
    with pytest.raises(Malformed):
        parse_client_hello(too_big[:9])  # refused as soon as the length is known


# --- TLS: refusals and names ------------------------------------------------------

@pytest.mark.parametrize("first_bytes", [
    IPERF3_COOKIE,
    CURL_HTTP,
    b"\x80\x2e\x01\x03\x01",  # SSLv2-style hello
    b"\x16\x04",  # record version 4.x
    b"\x17\x03\x03\x00\x10",  # application data first
    b"SSH-2.0-OpenSSH_9.2\r\n",
])
def test_not_tls(first_bytes):
    with pytest.raises(NotThisProtocol):
        parse_client_hello(first_bytes)


@pytest.mark.parametrize("prefix", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01\x02", b"\x16\x03\x01\x02\x00\x01"])
def test_short_prefixes_need_more(prefix):
    assert parse_client_hello(prefix) is NEED_MORE


def test_non_handshake_record_in_the_middle():
    flight = as_records(handshake_of(HELLOS["curl"]), [100])
    second_record = 5 + 100
    broken = flight[:second_record] + b"\x17" + flight[second_record + 1:]
    with pytest.raises(Malformed):
        parse_client_hello(broken[:second_record + 1])


@pytest.mark.parametrize("header", [b"\x16\x03\x01\x00\x00", b"\x16\x03\x01\x40\x01"])
def test_record_length_out_of_range(header):
    with pytest.raises(Malformed):
        parse_client_hello(header)


def test_handshake_that_is_not_a_client_hello():
    handshake = handshake_of(HELLOS["curl"])
    with pytest.raises(Malformed):
        parse_client_hello(as_records(b"\x02" + handshake[1:]))


@pytest.mark.parametrize("change", [
    "extensions length one short", "stray byte after the extensions", "extension truncated"])
def test_lengths_that_do_not_add_up(change):
    handshake = handshake_of(HELLOS["curl"])
    head, extensions = split_client_hello(handshake)
    body = handshake[4:]
    if change == "extensions length one short":  # the extensions block claims one byte less than is there
        block_length = int.from_bytes(body[len(head):len(head) + 2])
        body = body[:len(head)] + struct.pack("!H", block_length - 1) + body[len(head) + 2:]
    elif change == "stray byte after the extensions":
        body += b"\x00"
    else:  # the last extension claims two bytes more than the block holds
        last_type, last_data = extensions[-1]
        extensions[-1] = (last_type, last_data + b"xx")
        body = build_client_hello(head, extensions)[4:-2]
        body = head + struct.pack("!H", len(body) - len(head) - 2) + body[len(head) + 2:]
    with pytest.raises(Malformed):
        parse_client_hello(as_records(b"\x01" + len(body).to_bytes(3) + body))


def test_duplicate_sni_extension():
    handshake = handshake_of(HELLOS["curl"])
    head, extensions = split_client_hello(handshake)
    sni = next(data for ext_type, data in extensions if ext_type == 0)
    with pytest.raises(Malformed, match="duplicate"):
        parse_client_hello(as_records(build_client_hello(head, [(0, sni), *extensions])))


def test_two_host_names_in_one_sni_extension():
    with pytest.raises(Malformed):
        parse_client_hello(hello_with_sni((0, b"a.example"), (0, b"b.example")))


@pytest.mark.parametrize(("sni", "expected"), [
    (b"Mixed.Case.Example.", FirstFlight("mixed.case.example", H2_H1)),
    (b"192.0.2.7", FirstFlight(None, H2_H1, "ip_literal")),
    (b"2001:db8::1", FirstFlight(None, H2_H1, "ip_literal")),
    (b"bad\x00name.example", FirstFlight(None, H2_H1, "bad_name")),
    (b"under_score.example", FirstFlight(None, H2_H1, "bad_name")),
])
def test_sni_is_normalized(sni, expected):
    assert parse_client_hello(hello_with_sni((0, sni))) == expected


def test_sni_without_host_name_entry():
    assert parse_client_hello(hello_with_sni((7, b"opaque"))) == FirstFlight(None, H2_H1, "no_sni")


# --- TLS: fuzzing -------------------------------------------------------------------

@FUZZ
@given(data=st.binary(max_size=2000), cut=st.integers(min_value=0, max_value=2000))
def test_arbitrary_bytes(data, cut):
    assert_decision_is_final(parse_client_hello, data, cut)


@FUZZ
@given(body=st.binary(max_size=600), record_version=st.integers(0, 4), cut=st.integers(0, 700))
def test_arbitrary_client_hello_bodies(body, record_version, cut):
    handshake = b"\x01" + len(body).to_bytes(3) + body
    flight = struct.pack("!BBBH", 22, 3, record_version, len(handshake)) + handshake
    assert_decision_is_final(parse_client_hello, flight, cut)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 600), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 600)),
    st.tuples(st.just("insert"), st.integers(0, 600), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 600), st.integers(1, 8)),
)


def mutate(data: bytes, mutations) -> bytes:
    for kind, at, *args in mutations:
        at %= len(data) + 1
        if kind == "flip" and at < len(data):
            data = data[:at] + bytes([data[at] ^ (1 << args[0])]) + data[at + 1:]
        elif kind == "truncate":
            data = data[:at]
        elif kind == "insert":
            data = data[:at] + args[0] + data[at:]
        elif kind == "delete":
            data = data[:at] + data[at + args[0]:]
    return data


@FUZZ
@given(fixture=st.sampled_from(sorted(HELLOS)), mutations=st.lists(mutation, min_size=1, max_size=4),
       cut=st.integers(0, 600))
def test_mutated_real_hellos(fixture, mutations, cut):
    assert_decision_is_final(parse_client_hello, mutate(HELLOS[fixture], mutations), cut)


# --- names --------------------------------------------------------------------------

LDH_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=63)
HOST_NAMES = st.lists(LDH_LABEL, min_size=1, max_size=6).map(".".join).filter(
    lambda name: len(name) <= 253 and not name.rpartition(".")[2].isdigit()
    and not name.rpartition(".")[2].lower().startswith("0x"))


@pytest.mark.parametrize(("raw", "expected"), [
    ("Example.COM", ("example.com", "")),
    (b"example.com.", ("example.com", "")),
    ("xn--bcher-kva.example", ("xn--bcher-kva.example", "")),
    ("example.com..", (None, "bad_name")),
    ("", (None, "bad_name")),
    (".", (None, "bad_name")),
    ("a..b", (None, "bad_name")),
    (".example.com", (None, "bad_name")),
    ("a" * 64 + ".example", (None, "bad_name")),
    (".".join(["a" * 63] * 4), (None, "bad_name")),  # 255 characters
    ("*.example.com", (None, "bad_name")),
    ("under_score.example", (None, "bad_name")),
    (b"nul\x00.example", (None, "bad_name")),
    ("bücher.example", (None, "bad_name")),
    (b"b\xc3\xbccher.example", (None, "bad_name")),
    ("10.0.0.1", (None, "ip_literal")),
    ("10.0.0.1.", (None, "ip_literal")),
    ("127.1", (None, "ip_literal")),
    ("0x7f.0.0.1", (None, "ip_literal")),
    ("::1", (None, "ip_literal")),
    ("[2001:DB8::1]", (None, "ip_literal")),
    ("[::1", (None, "bad_name")),
])
def test_normalize_name_examples(raw, expected):
    assert normalize_name(raw) == expected


@given(name=HOST_NAMES, trailing_dot=st.booleans())
def test_valid_names_are_accepted_lower_case(name, trailing_dot):
    raw = name + "." * trailing_dot
    assert normalize_name(raw) == (name.lower(), "")
    assert normalize_name(raw.encode()) == (name.lower(), "")


@given(address=st.ip_addresses())
def test_ip_addresses_are_literals(address):
    assert normalize_name(str(address)) == (None, "ip_literal")
    if address.version == 6:
        assert normalize_name(f"[{address}]") == (None, "ip_literal")


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_normalize_name_properties(raw):
    name, problem = normalize_name(raw)
    if name is None:
        assert problem in ("bad_name", "ip_literal")
        return
    assert problem == ""
    assert name == name.lower() and not name.endswith(".") and 0 < len(name) <= 253
    assert normalize_name(name) == (name, "")  # idempotent
    assert normalize_name(name.upper() + ".") == (name, "")
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.")
    assert all(0 < len(label) <= 63 for label in name.split("."))


# The verdict as regular expressions say it, which normalize_name's loops replace: LDH labels of
# 1 to 63 bytes, and a last label that is a number makes an IP literal. test_live_fuzz's reading,
# independent of the parser, uses them too.
LDH_NAME = re.compile(rb"(?:[a-z0-9-]{1,63}\.)*[a-z0-9-]{1,63}")
NUMERIC_LABEL = re.compile(rb"[0-9]+|0x[0-9a-f]*")


def regex_verdict(raw: bytes) -> tuple[str | None, str]:
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    inner = name[1:-1] if name.startswith(b"[") and name.endswith(b"]") else name
    if b":" in inner:
        try:
            ipaddress.IPv6Address(inner.decode("ascii"))
            return None, "ip_literal"
        except (ValueError, UnicodeDecodeError):
            pass
    elif NUMERIC_LABEL.fullmatch(inner.rpartition(b".")[2]):
        return None, "ip_literal"
    if len(name) > 253 or not LDH_NAME.fullmatch(name):
        return None, "bad_name"
    return name.decode(), ""


# Names near the edges: numeric and hex last labels, hyphens, empty and 63-byte labels.
NAME_PIECES = st.lists(st.sampled_from([b"a", b"Z", b"0", b"9", b"0x", b"x", b"f", b"g", b"-", b".", b"_", b"[", b"]",
                                        b":", b"::1", b"\xff", b"a" * 62, b"7" * 63]), max_size=12).map(b"".join)


@FUZZ
@given(raw=NAME_PIECES)
def test_normalize_name_agrees_with_the_regular_expressions(raw):
    assert normalize_name(raw) == regex_verdict(raw)


# --- TLS: field-aware fuzzing, from the real hellos -------------------------------
# Random bytes rarely start with 0x16; these mutants keep the record and
# handshake framing, so they exercise the extension, SNI and ALPN parsing.
# Strategies are built once here: building them per draw doubled the run time.

FIXTURES = st.sampled_from(sorted(HELLOS))
SPELLED_HOST_NAMES = st.tuples(HOST_NAMES, st.sampled_from(["", "."])).map(lambda t: "".join(t).encode())
# Printable ASCII, which the parser and the oracle decode alike.
ALPN_LISTS = st.lists(st.binary(min_size=1, max_size=8).map(lambda name: bytes(0x21 + b % 94 for b in name)),
                      min_size=1, max_size=3)
UNKNOWN_EXTENSIONS = st.dictionaries(st.integers(1, 0xFFFF).filter(lambda ext_type: ext_type != 16),
                                     st.binary(max_size=40), max_size=3)
VALID_HEAD_FIELDS = {
    "version": st.integers(0, 255).map(lambda minor: bytes([3, minor])),
    "random": st.binary(min_size=32, max_size=32),
    "session_id": st.binary(max_size=32),
    "cipher_suites": st.lists(st.binary(min_size=2, max_size=2), min_size=1, max_size=20).map(b"".join),
    "compression": st.binary(min_size=1, max_size=4),
}
BROKEN_HEAD_FIELDS = {
    "version": st.binary(min_size=2, max_size=2),
    "session_id": st.binary(min_size=33, max_size=40),
    "cipher_suites": st.binary(max_size=7),
    "compression": st.just(b""),
    "msg_type": st.integers(0, 255),
}
SNI_VALUES = st.one_of(
    HOST_NAMES.map(str.encode),
    st.tuples(HOST_NAMES, st.integers(0, 253)).map(lambda t: t[0][:t[1]].encode() + b"\x00" + t[0][t[1]:].encode()),
    st.tuples(st.integers(63, 70), st.integers(1, 5)).map(lambda t: b".".join([b"a" * t[0]] * t[1])),
    st.ip_addresses().map(lambda address: str(address).encode()),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]".encode()),
    st.sampled_from([b"", b".", b"a..b", b"example.com..", b"*.example", b"under_score.example"]),
    st.binary(max_size=40),
)
# Mostly one host_name entry, so the name itself gets judged; else a mix (none, two, other types).
SNI_LISTS = SNI_VALUES.map(lambda value: [(0, value)]) | st.lists(
    st.tuples(st.sampled_from([0, 1, 255]), SNI_VALUES), min_size=1, max_size=3)
ALPN_ANY = st.lists(st.binary(max_size=12), max_size=4)
EXTENSION_TYPES = st.sampled_from([0, 16, EXT_PADDING, EXT_KEY_SHARE]) | st.integers(0, 0xFFFF)
ONE_IN_FOUR = st.sampled_from([False, False, False, True])  # Hypothesis favours the first choice
CHANGES = st.sampled_from(["order", "sni", "type", "drop", "copy", "add", "sni", "alpn", "head"])
SIZED_LENGTHS = {"server_name_list", "server_name", "alpn_list"}  # always refused when wrong, see below


def changed_fields(draw, hello: Hello, fields: dict) -> Hello:
    """The hello with each field in `fields` kept or, by a coin toss, redrawn."""
    return replace(hello, **{name: draw(value) for name, value in fields.items() if draw(st.booleans())})


@st.composite
def valid_hellos(draw, host_name: bool = False) -> Hello:
    """A real hello with fields changed in ways that keep it well formed, and its extensions reordered."""
    hello = decompose(handshake_of(HELLOS[draw(FIXTURES)]))
    extensions = dict(hello.extensions)
    if host_name or draw(st.booleans()):
        extensions[0] = sni_piece([(0, draw(SPELLED_HOST_NAMES))])
    if draw(st.booleans()):
        extensions[16] = alpn_piece(draw(ALPN_LISTS))
    for ext_type, data in draw(UNKNOWN_EXTENSIONS).items():
        extensions.setdefault(ext_type, Piece(data))
    extensions = tuple(draw(st.permutations(list(extensions.items()))))
    return changed_fields(draw, replace(hello, extensions=extensions), VALID_HEAD_FIELDS)


def changed_hello(draw, hello: Hello) -> Hello:
    """One change: an extension's type, their order or count, the SNI or ALPN data, or a head field."""
    kind = draw(CHANGES)
    extensions = list(hello.extensions)
    at = draw(st.integers(0, len(extensions)))
    if kind == "head":
        field = draw(st.sampled_from(sorted(BROKEN_HEAD_FIELDS)))
        return replace(hello, **{field: draw(BROKEN_HEAD_FIELDS[field])})
    if kind in ("sni", "alpn"):
        ext_type, data = (0, sni_piece(draw(SNI_LISTS))) if kind == "sni" else (16, alpn_piece(draw(ALPN_ANY)))
        extensions = [(t, d) for t, d in extensions if t != ext_type]
        extensions.insert(min(at, len(extensions)), (ext_type, data))
    elif kind == "order":
        extensions = draw(st.permutations(extensions))
    elif kind == "add" or not extensions:
        extensions.insert(at, (draw(EXTENSION_TYPES), Piece(draw(st.binary(max_size=64)))))
    else:
        i = draw(st.integers(0, len(extensions) - 1))
        ext_type, data = extensions[i] if kind == "copy" else extensions.pop(i)
        if kind == "type":  # a random or known type, or one already there
            extensions.insert(i, (draw(EXTENSION_TYPES | st.sampled_from([t for t, _ in hello.extensions])), data))
        elif kind == "copy":
            extensions.insert(at, (ext_type, data))
    return replace(hello, extensions=tuple(extensions))


def with_wrong_length(draw, piece: Piece, what=None) -> bytes:
    """The piece with one length field (of a kind in `what`, if given) set to a wrong value."""
    fields = [i for i, field in enumerate(piece.lengths) if what is None or field[2] in what]
    # Hypothesis often draws the first choice: make it the innermost field, not the record length.
    index = draw(st.sampled_from(fields[::-1]))
    at, size, _ = piece.lengths[index]
    true, top = int.from_bytes(piece.data[at:at + size]), 256**size - 1
    value = draw(st.sampled_from([true - 1, true + 1, true - 2, true + 2, true - 3, true + 3, 0, top])
                 | st.integers(0, top))
    return piece.with_length(index, value if value != true and 0 <= value <= top else true ^ 1)


@st.composite
def mutated_flights(draw) -> bytes:
    """A real hello with 1 to 3 changes, split into records, maybe with a length set wrong."""
    hello = draw(valid_hellos())
    for _ in range(draw(st.integers(1, 3))):
        hello = changed_hello(draw, hello)
    flight = in_records(hello.encoded(), draw(st.lists(st.integers(0, 1200), max_size=6)))
    return with_wrong_length(draw, flight) if draw(ONE_IN_FOUR) else flight.data


def kind_of(result) -> str:
    """A label for an outcome: NEED_MORE, the refusal's class, or the FirstFlight's name problem."""
    if isinstance(result, FirstFlight):
        return f"FirstFlight {result.name_problem or 'named'}"
    return getattr(result, "__name__", repr(result))


@fixture_names
def test_decomposer_round_trips_and_oracle_agrees(fixture):
    handshake = handshake_of(HELLOS[fixture])
    hello = decompose(handshake)
    assert hello.encoded().data == handshake
    assert in_records(hello.encoded(), []).data == HELLOS[fixture]
    assert expected_flight(hello) == EXPECTED_HELLOS[fixture]


@FUZZ
@given(hello=valid_hellos(), record_cuts=cut_points, segment_cuts=cut_points)
def test_valid_field_changes_parse_as_the_oracle_says(hello, record_cuts, segment_cuts):
    flight = in_records(hello.encoded(), record_cuts).data
    assert_fed_in_pieces(parse_client_hello, flight, segment_cuts, expected_flight(hello))


@FUZZ
@given(data=st.data(), hello=valid_hellos(host_name=True), record_cuts=cut_points, segment_cuts=cut_points)
def test_wrong_sni_or_alpn_length_is_refused(data, hello, record_cuts, segment_cuts):
    # The outer lengths stay right. A list length must fill its extension; a host
    # name length that falls short leaves name bytes (>= 0x2d) to be read as a huge
    # length. (An ALPN name length can swallow the next names exactly, so is left out.)
    handshake = with_wrong_length(data.draw, hello.encoded(), SIZED_LENGTHS)
    assert_fed_in_pieces(parse_client_hello, as_records(handshake, record_cuts), segment_cuts, Malformed)


@settings(max_examples=1000, deadline=2000)   # 300 missed a last extension cut 1-3 bytes short
@given(flight=mutated_flights(), cuts=st.lists(st.integers(0, 2000), min_size=1, max_size=4))
def test_field_mutated_hellos(flight, cuts):
    event(kind_of(outcome(parse_client_hello, flight)))
    for cut in cuts:
        assert_decision_is_final(parse_client_hello, flight, cut % (len(flight) + 1))


def test_field_mutants_reach_deep():
    """Guards the fuzzer itself: its mutants must get past the framing into the extensions."""
    seen = collections.Counter()

    @settings(max_examples=300, derandomize=True, database=None, phases=[Phase.generate])
    @given(flight=mutated_flights())
    def parse(flight):
        seen[kind_of(outcome(parse_client_hello, flight))] += 1

    parse()
    total = sum(seen.values())
    assert seen["NotThisProtocol"] < total / 10, seen
    assert sum(n for kind, n in seen.items() if kind.startswith("FirstFlight")) > total / 3, seen
    assert seen["Malformed"] > total / 10, seen
    # Each name outcome needs the SNI extension found, parsed and its name judged.
    assert {f"FirstFlight {problem}" for problem in ("named", "no_sni", "bad_name", "ip_literal")} <= set(seen), seen


# --- HTTP ----------------------------------------------------------------------------

def http_head(request_line: str, *fields: str) -> bytes:
    return "\r\n".join([request_line, *fields, "", ""]).encode("latin-1")


@pytest.mark.parametrize(("head", "expected"), [
    (CURL_HTTP, FirstFlight("curl.example.test")),  # Host carries a port
    (http_head("GET / HTTP/1.1", "Host: Example.com"), FirstFlight("example.com")),
    (http_head("GET / HTTP/1.1", "hOsT:   example.com:8080  "), FirstFlight("example.com")),
    (http_head("GET / HTTP/1.0", "Host: example.com."), FirstFlight("example.com")),
    (http_head("GET http://Abs.Example:8080/x?y HTTP/1.1", "Host: other.example"), FirstFlight("abs.example")),
    (http_head("GET HTTP://user:pw@abs.example/ HTTP/1.1", "Host: other.example"), FirstFlight("abs.example")),
    (http_head("GET http://abs.example HTTP/1.0"), FirstFlight("abs.example")),
    (http_head("GET / HTTP/1.1", "Host: [2001:db8::1]:443"), FirstFlight(None, name_problem="ip_literal")),
    (http_head("GET / HTTP/1.1", "Host: [::1]"), FirstFlight(None, name_problem="ip_literal")),
    (http_head("GET / HTTP/1.1", "Host: 198.18.0.1:80"), FirstFlight(None, name_problem="ip_literal")),
    (http_head("GET http://[::1]:80/ HTTP/1.1", "Host: x.example"), FirstFlight(None, name_problem="ip_literal")),
    (http_head("GET / HTTP/1.1", "Host: example.com:http"), FirstFlight(None, name_problem="bad_name")),
    (http_head("GET / HTTP/1.1", "Host: under_score.example"), FirstFlight(None, name_problem="bad_name")),
    (http_head("GET / HTTP/1.1", "Host:"), FirstFlight(None, name_problem="no_host")),
    (http_head("GET / HTTP/1.0"), FirstFlight(None, name_problem="no_host")),
    (http_head("GET / HTTP/1.0", "Accept: */*"), FirstFlight(None, name_problem="no_host")),
    (http_head("POST /form HTTP/1.1", "Content-Length: 3", "Host: post.example") + b"a=b",
     FirstFlight("post.example")),
])
def test_http_names(head, expected):
    assert parse_http_request(head) == expected


@pytest.mark.parametrize("head", [
    http_head("GET / HTTP/1.1", "Host: a.example", "host: b.example"),
    http_head("GET / HTTP/1.1", "Accept: */*"),  # HTTP/1.1 requires Host
    http_head("GET / HTTP/1.1", "Host : a.example"),
    http_head("GET / HTTP/1.1", "Accept: */*", " folded", "Host: a.example"),
    http_head("GET / HTTP/1.1", "no colon", "Host: a.example"),
    http_head("GET  / HTTP/1.1", "Host: a.example"),
    http_head("GET / HTTP/1.1 extra", "Host: a.example"),
    http_head("GET / http/1.1", "Host: a.example"),
    http_head("GET /\x01 HTTP/1.1", "Host: a.example"),
    b"GET / HTTP/1.1\nHost: a.example\n\n",
    b"GET / HTTP/1.1\r\nHost: a\x00.example\r\n\r\n",
])
def test_http_malformed(head):
    with pytest.raises(Malformed):
        parse_http_request(head)


def test_http_head_size_limit():
    fields = [f"X-Filler-{i}: {'v' * 90}" for i in range(MAX_HTTP_HEAD // 100)]
    head = http_head("GET / HTTP/1.1", "Host: big.example", *fields)
    assert len(head) > MAX_HTTP_HEAD
    fitting = http_head("GET / HTTP/1.1", "Host: big.example", *fields[:150])
    assert len(fitting) < MAX_HTTP_HEAD
    assert parse_http_request(fitting) == FirstFlight("big.example")
    assert parse_http_request(head[:MAX_HTTP_HEAD - 1]) is NEED_MORE
    with pytest.raises(Malformed):
        parse_http_request(head[:MAX_HTTP_HEAD])


@pytest.mark.parametrize("first_bytes", [
    HELLOS["curl"],
    IPERF3_COOKIE,
    b"\x00\x01\x02",
    b" GET / HTTP/1.1\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # HTTP/2 prior-knowledge preface
    b"SSH-2.0-OpenSSH_9.2\r\n",
])
def test_not_http(first_bytes):
    with pytest.raises(NotThisProtocol):
        parse_http_request(first_bytes)


def test_http_one_byte_at_a_time():
    head = CURL_HTTP
    assert_fed_in_pieces(parse_http_request, head, range(len(head)), FirstFlight("curl.example.test"))


@settings(max_examples=50, deadline=2000)
@given(cuts=cut_points)
def test_http_in_random_segments(cuts):
    assert_fed_in_pieces(parse_http_request, CURL_HTTP, cuts, FirstFlight("curl.example.test"))


@FUZZ
@given(data=st.binary(max_size=500), cut=st.integers(0, 500))
def test_http_arbitrary_bytes(data, cut):
    assert_decision_is_final(parse_http_request, data, cut)


@FUZZ
@given(fields=st.binary(max_size=300), cut=st.integers(0, 400))
def test_http_arbitrary_fields(fields, cut):
    assert_decision_is_final(parse_http_request, b"GET / HTTP/1.1\r\n" + fields + b"\r\n\r\n", cut)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=4), cut=st.integers(0, 100))
def test_http_mutated_request(mutations, cut):
    assert_decision_is_final(parse_http_request, mutate(CURL_HTTP, mutations), cut)


@pytest.mark.parametrize("flight", [
    bytes([22, 3, 1, 0, 5, 2]),              # a ServerHello's type byte, nothing after it yet
    bytes([22, 3, 3, 0, 64, 11, 0]),          # Certificate
])
def test_a_handshake_type_that_is_not_client_hello_is_refused_at_its_first_byte(flight):
    with pytest.raises(Malformed, match="not ClientHello"):
        parse_client_hello(flight)


# --- compiled and interpreted ------------------------------------------------------

def _interpreted():
    """firstflight.py as the interpreter runs it, beside the compiled module tested above."""
    source = pathlib.Path(firstflight.__file__).with_name("firstflight.py")
    spec = importlib.util.spec_from_file_location("firstflight_interpreted", source)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)   # for its dataclasses
    spec.loader.exec_module(module)
    return module


INTERPRETED = _interpreted()


def test_the_parser_runs_compiled_from_its_current_source():
    """scripts/setup compiles it (setup.py); a build older than its source would test stale code."""
    assert firstflight.COMPILED, firstflight.__file__
    assert not INTERPRETED.COMPILED
    built = pathlib.Path(firstflight.__file__).stat().st_mtime
    for source in ("firstflight.py", "firstflight.pxd"):
        assert pathlib.Path(firstflight.__file__).with_name(source).stat().st_mtime <= built, \
            f"{source} is newer than its compiled module: run scripts/setup"


def decision(parse, data):
    """What a parser decides, comparable across the two modules: the flight's fields,
    NEED_MORE, or the refusal's class name and message."""
    try:
        flight = parse(data)
    except Exception as error:  # noqa: BLE001 - a TypeError from the compiled one must show too
        return type(error).__name__, str(error)
    return flight if flight is NEED_MORE or flight is INTERPRETED.NEED_MORE else \
        (flight.name, flight.alpn, flight.name_problem)


def assert_both_decide_alike(data: bytes) -> None:
    for name in ("parse_client_hello", "parse_http_request"):
        compiled, interpreted = decision(getattr(firstflight, name), data), decision(getattr(INTERPRETED, name), data)
        if compiled is NEED_MORE:
            assert interpreted is INTERPRETED.NEED_MORE, (name, data)
        else:
            assert compiled == interpreted, (name, data)


@fixture_names
def test_compiled_and_interpreted_agree_on_real_hellos(fixture):
    flight = HELLOS[fixture]
    for cut in range(len(flight) + 1):
        assert_both_decide_alike(flight[:cut])


@FUZZ
@given(fixture=st.sampled_from(sorted(HELLOS)), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_compiled_and_interpreted_agree_on_mutated_hellos(fixture, mutations):
    assert_both_decide_alike(mutate(HELLOS[fixture], mutations))


@FUZZ
@given(data=st.binary(max_size=2000))
def test_compiled_and_interpreted_agree_on_arbitrary_bytes(data):
    assert_both_decide_alike(data)
