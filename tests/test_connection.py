"""The Connection state machine from accept to its one access-log record.

Real loopback sockets for the client and the backends, and the real router,
source filter, counters and access log; a fake resolver and a fake relay, so a
test decides what a name resolves to and when the relay ends. Connections run
in this thread's gevent hub as in a worker: a test drives the hub until the
connection was handed to the relay or ended.
"""
from __future__ import annotations

import _socket
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import gevent
import pytest

from harness import free_port, hub_wait_until, recv_exactly, recv_nowait
from sniproxy import config
from sniproxy.accesslog import AccessLog
from sniproxy.connection import Connection, Context
from sniproxy.counters import CounterTable
from sniproxy.relay import Limits, RelayResult
from sniproxy.resolver import ResolveError
from sniproxy.routing import Router
from sniproxy.sourcefilter import SourceFilter

FLIGHTS = Path(__file__).parent / "fixtures" / "hellos"
CURL = (FLIGHTS / "curl.bin").read_bytes()                        # SNI curl.example.test, ALPN h2,http/1.1
NO_SNI = (FLIGHTS / "openssl_noservername.bin").read_bytes()
CURL_HTTP = (FLIGHTS / "curl_http.bin").read_bytes()              # Host: Curl.Example.Test:40243
IPERF3 = (FLIGHTS / "iperf3.bin").read_bytes()                    # neither TLS nor HTTP
NAME = "curl.example.test"

ALERT_UNRECOGNIZED_NAME = b"\x15\x03\x03\x00\x02\x02\x70"
HTTP_400, HTTP_421, HTTP_503 = (b"HTTP/1.1 %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status
                                for status in (b"400 Bad Request", b"421 Misdirected Request",
                                               b"503 Service Unavailable"))


class FakeResolver:
    """cached() answers from `cache`, resolve() from `dns`: a list, or an exception to raise.
    Both hand out the very list they hold, as a shared DNS query's waiters get it."""

    def __init__(self, cache: dict | None = None, dns: dict | None = None):
        self.cache, self.dns, self.queries = cache or {}, dns or {}, []

    def cached(self, name):
        return self.cache.get(name)

    def resolve(self, name):
        self.queries.append(name)
        gevent.sleep(0.01)                  # a query waits on the network
        answer = self.dns.get(name, ResolveError(f"{name}: no such domain"))
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeRelay:
    """Records each start(); the test ends a pair by calling its on_done."""
    kind = "fake"

    def __init__(self):
        self.started = []

    def start(self, client, upstream, limits, on_done, record=None, tls=False):
        pair = SimpleNamespace(client=client, upstream=upstream, limits=limits, on_done=on_done, tls=tls,
                               cancel=lambda: pytest.fail("a Connection never cancels its relay"))
        self.started.append(pair)
        return pair

    def close(self):
        pass


class Rig:
    """One listener's worth of a worker: a Context built from a config, a listening
    socket to accept on, and readers for what the connections left behind."""

    def __init__(self, tmp_path: Path, routes=(), *, protocol="tls", fallback="", extra="", resolver=None):
        self.listening = socket.create_server(("127.0.0.1", 0))
        self.listening.settimeout(5)
        port = self.listening.getsockname()[1]   # a backend may name it as {listener_port}
        text = f'[[listener]]\naddress = "127.0.0.1:{port}"\nprotocol = "{protocol}"\nfallback = "{fallback}"\n'
        text += "".join(f"[[table.default]]\nmatch = '{m}'\nbackend = '{b.format(listener_port=port)}'\n"
                        for m, b in routes)
        cfg = config.load(text=text + extra)
        self.lc = cfg.listener[0]
        self.table = CounterTable(tmp_path / "counters", create=True)
        self.log_path = tmp_path / "access.log"
        self.relay, self.resolver = FakeRelay(), resolver or FakeResolver()
        self.ended, self.connections, self.clients = [], [], []
        self.ctx = Context(
            loop=gevent.get_hub().loop, counters=self.table.row(3),
            source_filter=SourceFilter(cfg.access.allow, cfg.access.deny), router=Router(cfg),
            resolver=self.resolver, relay=self.relay, timeouts=cfg.timeouts,
            limits=Limits(cfg.timeouts.idle, cfg.timeouts.half_closed), allow_private=cfg.resolver.allow_private,
            access_log=AccessLog(str(self.log_path)), ended=self.ended.append)

    def connect(self, data: bytes = b"", close: bool = False):
        """A client that sends data (and closes, if close), accepted and started as worker.py does."""
        client = socket.create_connection(self.listening.getsockname(), timeout=5)
        self.clients.append(client)
        client.sendall(data)
        if close:
            client.close()
        fd, peer = self.listening._accept()
        conn = Connection(self.ctx, self.lc, _socket.socket(self.listening.family, socket.SOCK_STREAM, 0, fd), peer)
        self.connections.append(conn)
        conn.start()
        return client, conn

    def settle(self, conn: Connection, timeout: float = 5):
        """Run the hub until conn ended or was handed to the relay; the relay's pair, if so."""
        hub_wait_until(lambda: conn.ended or self.pair_of(conn), timeout, "the connection to settle")
        return self.pair_of(conn)

    def run(self, data: bytes = b"", close: bool = False):
        client, conn = self.connect(data, close)
        return client, conn, self.settle(conn)

    def pair_of(self, conn: Connection):
        return next((p for p in self.relay.started if p.client is conn.client), None)

    def records(self) -> list[dict]:
        """The access log's lines as {field: text}."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        return [dict(field.split("=", 1) for field in line.split()[1:]) for line in lines]

    def counters(self) -> dict[str, int]:
        return {name: n for name, n in self.table.totals().items() if n}

    def check_each_ended_once(self) -> None:
        gevent.sleep(0.05)    # a stray watcher or timer would fire now
        assert [self.ended.count(c) for c in self.connections] == [1] * len(self.connections)
        assert len(self.ended) == len(self.records()) == len(self.connections)

    def close(self) -> None:
        for s in (self.listening, *self.clients):
            s.close()


@pytest.fixture
def rig(tmp_path):
    """rig(routes, **options) -> a Rig; every connection it made must have ended exactly once,
    with one access-log record each."""
    made = []

    def make(routes=(), **kw):
        directory = tmp_path / f"rig{len(made)}"
        directory.mkdir()
        made.append(Rig(directory, routes, **kw))
        return made[-1]

    yield make
    try:
        for r in made:
            r.check_each_ended_once()
    finally:
        for r in made:
            r.close()


@pytest.fixture
def backend():
    """A loopback server that the test accepts on itself: .sock, .port and .address."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        s.settimeout(5)
        port = s.getsockname()[1]
        yield SimpleNamespace(sock=s, port=port, address=f"127.0.0.1:{port}")


def answer_and_close(client: socket.socket) -> bytes:
    """All the proxy sent the client, up to its close (a reset, where it closed on bytes it never read)."""
    data = b""
    try:
        while chunk := client.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def backend_got(listening: socket.socket, expected: bytes) -> None:
    """A connection came in on listening, with exactly `expected` so far."""
    conn, _ = listening.accept()
    with conn:
        conn.settimeout(5)
        assert recv_exactly(conn, len(expected)) == expected
        assert recv_nowait(conn) is None


def reason(record: dict) -> str:
    """The refusal reason of an outcome like "refused:no_route:_name"."""
    return record["outcome"].removeprefix("refused:").split(":")[0]


# --- relayed ----------------------------------------------------------------------

@pytest.mark.parametrize("result, counted", [
    (RelayResult(100, 2000, "done"), {"relayed_userspace": 1, "bytes_up_userspace": len(CURL) + 100,
                                      "bytes_down_userspace": 2000}),
    (RelayResult(7, 9, "idle_timeout"), {"relayed_userspace": 1, "bytes_up_userspace": len(CURL) + 7,
                                         "bytes_down_userspace": 9, "idle_timeout": 1}),
    (RelayResult(5000, 6000, "done", "kernel", 4000, 5500),        # the kernel counts what it redirected
     {"relayed_kernel": 1, "bytes_up_userspace": len(CURL) + 1000, "bytes_down_userspace": 500}),
], ids=["userspace", "idle_timeout", "kernel"])
def test_hello_is_sent_to_the_backend_and_the_pair_relayed(rig, backend, result, counted):
    r = rig([("*.example.com", "192.0.2.1:1"), (NAME, backend.address)],
            extra="[timeouts]\nclient_hello = 0.1\nconnect = 0.1\nidle = 77.0\nhalf_closed = 7.0\n")
    client, conn, pair = r.run(CURL)
    assert pair is not None, r.records()
    backend_got(backend.sock, CURL)
    assert (pair.client, pair.upstream) == (conn.client, conn.upstream)
    assert pair.upstream.getpeername() == backend.sock.getsockname()
    assert pair.limits == Limits(77.0, 7.0)
    assert pair.tls is True          # a ClientHello: relay.tls_fast_relay applies
    gevent.sleep(0.3)          # past client_hello and connect: their timers were stopped
    assert r.ended == [] and r.records() == []
    pair.on_done(result)
    assert r.ended == [conn]
    [record] = r.records()
    assert record | {"duration": "-"} == {
        "client": "127.0.0.1:%d" % client.getsockname()[1], "listener": r.lc.address, "name": NAME,
        "alpn": "h2,http/1.1", "backend": backend.address, "up": str(len(CURL) + result.up),
        "down": str(result.down), "duration": "-", "relay": result.kind, "outcome": result.outcome}
    assert r.counters() == {"accepted": 1, **counted}
    assert answer_and_close(client) == b""           # both sockets closed after the relay


def test_names_from_the_client_stay_one_field_of_one_log_line(rig, backend):
    """ALPN names are the client's bytes: a space, a newline, a backslash or a byte above
    ASCII in one must not split the line or its fields."""
    from test_firstflight import as_records, handshake_of, with_extension
    names = [b"a b", b"x\ny\\", b"\xff\x7f"]
    alpn = b"".join(bytes([len(n)]) + n for n in names)
    r = rig([(NAME, backend.address)])
    _, _, pair = r.run(as_records(with_extension(handshake_of(CURL), 16, len(alpn).to_bytes(2, "big") + alpn)))
    pair.on_done(RelayResult(0, 0, "done"))
    assert len(r.log_path.read_text().splitlines()) == 1
    [record] = r.records()
    assert record["alpn"] == "a_b,x\\x0ay\\\\,\\\\xff\\x7f" and record["outcome"] == "done"


def test_hello_in_pieces_waits_for_the_rest(rig, backend):
    r = rig([(NAME, backend.address)], extra="[timeouts]\nclient_hello = 0.3\n")
    client, conn = r.connect(CURL[:100])
    gevent.sleep(0.1)
    assert not conn.ended and r.relay.started == []
    client.sendall(CURL[100:])
    pair = r.settle(conn)
    backend_got(backend.sock, CURL)
    # Once relayed, the client's bytes are the relay's: no watcher of the first flight
    # reads them, and its timer does not end the connection.
    client.sendall(b"early data")
    gevent.sleep(0.4)
    assert not conn.ended and recv_nowait(conn.client) == b"early data"
    pair.on_done(RelayResult(0, 0, "done"))
    assert r.records()[0]["up"] == str(len(CURL))


def test_not_tls_goes_to_the_fallback(rig, backend):
    r = rig([(NAME, "192.0.2.1:1")], fallback=backend.address)
    _, _, pair = r.run(IPERF3)
    backend_got(backend.sock, IPERF3)
    assert pair.tls is False
    pair.on_done(RelayResult(0, 3, "done"))
    [record] = r.records()
    assert (record["name"], record["backend"], record["outcome"]) == ("(not_tls)", backend.address, "done")
    assert r.counters() == {"accepted": 1, "fallback": 1, "relayed_userspace": 1,
                            "bytes_up_userspace": len(IPERF3), "bytes_down_userspace": 3}


# --- refused ----------------------------------------------------------------------

@pytest.mark.parametrize("protocol, data, refusal, answer", [
    ("tls", CURL, "no_route", ALERT_UNRECOGNIZED_NAME),
    ("tls", NO_SNI, "no_name", ALERT_UNRECOGNIZED_NAME),
    ("tls", IPERF3, "not_protocol", b""),
    ("tls", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "malformed", b""),   # a ServerHello
    ("http", CURL_HTTP, "no_route", HTTP_421),
    ("http", b"GET / HTTP/1.0\r\n\r\n", "no_name", HTTP_421),
    ("http", b"GET / HTTP/1.1\r\n\r\n", "malformed", HTTP_400),            # 1.1 must have a Host
    ("http", IPERF3, "not_protocol", b""),
], ids=["tls-no_route", "tls-no_name", "tls-not_protocol", "tls-malformed", "http-no_route", "http-no_name",
        "http-malformed", "http-not_protocol"])
def test_refusal_answers_and_closes(rig, backend, protocol, data, refusal, answer):
    r = rig([("other.test", backend.address)], protocol=protocol)
    client, _, pair = r.run(data)
    assert pair is None
    assert answer_and_close(client) == answer
    [record] = r.records()
    assert reason(record) == refusal and record["backend"] == "-"
    assert r.counters() == {"accepted": 1, f"refused_{refusal}": 1}


def test_client_hello_timeout(rig):
    r = rig([(NAME, "192.0.2.1:1")], extra="[timeouts]\nclient_hello = 0.2\n")
    started = time.monotonic()
    client, _, _ = r.run(CURL[:100])
    assert 0.15 <= time.monotonic() - started < 1.5   # libev times from its loop time, a little stale
    assert answer_and_close(client) == b""
    assert reason(r.records()[0]) == "client_hello_timeout"
    assert r.counters() == {"accepted": 1, "refused_client_hello_timeout": 1}


def test_client_closing_mid_hello_is_malformed(rig):
    r = rig([(NAME, "192.0.2.1:1")])
    r.run(CURL[:100], close=True)
    assert reason(r.records()[0]) == "malformed"
    assert r.counters() == {"accepted": 1, "refused_malformed": 1}


def test_client_closing_without_sending_is_closed_early(rig):
    r = rig([(NAME, "192.0.2.1:1")])
    r.run(close=True)
    assert r.records()[0]["outcome"] == "closed_early"
    assert r.counters() == {"accepted": 1, "closed_early": 1}


@pytest.mark.parametrize("access", ['deny = ["127.0.0.0/8"]', 'allow = ["10.0.0.0/8"]'])
def test_source_filter_refuses_before_reading(rig, backend, access):
    r = rig([(NAME, backend.address)], extra=f"[access]\n{access}\n")
    client, _, _ = r.run(CURL)
    assert answer_and_close(client) == b""
    [record] = r.records()
    assert (reason(record), record["name"]) == ("access_denied", "-")     # the hello was never read
    assert r.counters() == {"accepted": 1, "refused_access_denied": 1}


@pytest.mark.parametrize("protocol, data, answer", [("tls", CURL, b""), ("http", CURL_HTTP, HTTP_503)],
                         ids=["tls", "http"])
def test_resolve_failure(rig, protocol, data, answer):
    r = rig([(NAME, "app.test:443")], protocol=protocol)
    client, _, _ = r.run(data)
    assert r.resolver.queries == ["app.test"]
    assert answer_and_close(client) == answer
    assert reason(r.records()[0]) == "resolve_failed"
    assert r.counters() == {"accepted": 1, "refused_resolve_failed": 1}


def test_a_bug_in_a_step_still_ends_the_connection(rig):
    r = rig([(NAME, "app.test:443")], resolver=FakeResolver(dns={"app.test": RuntimeError("bug")}))
    client, _, _ = r.run(CURL)
    assert answer_and_close(client) == b""
    assert r.records()[0]["outcome"] == "error:RuntimeError:bug"
    assert r.counters() == {"accepted": 1, "errors": 1}


@pytest.mark.parametrize("where", ["cache", "dns"])
@pytest.mark.parametrize("allow_private", [False, True])
def test_star_backend_takes_only_public_addresses(rig, backend, where, allow_private):
    port = backend.port
    resolver = FakeResolver(**{where: {NAME: ["127.0.0.1", "10.1.2.3", "::1"]}})
    r = rig([("*.example.test", f"*:{port}")], resolver=resolver,
            extra=f"[resolver]\nallow_private = {str(allow_private).lower()}\n")
    client, _, pair = r.run(CURL)
    assert resolver.queries == ([NAME] if where == "dns" else [])
    if allow_private:
        backend_got(backend.sock, CURL)
        pair.on_done(RelayResult(0, 0, "done"))
        assert r.records()[0]["backend"] == backend.address
    else:
        assert pair is None and answer_and_close(client) == b""
        assert reason(r.records()[0]) == "private_address"
        assert r.counters() == {"accepted": 1, "refused_private_address": 1}


@pytest.mark.parametrize("allow_private", [False, True])
def test_star_backend_refuses_a_loop_into_its_own_listener(rig, allow_private):
    r = rig([("*.example.test", "*:{listener_port}")], protocol="http",
            resolver=FakeResolver(cache={NAME: ["127.0.0.1", "::ffff:127.0.0.1"]}),
            extra=f"[resolver]\nallow_private = {str(allow_private).lower()}\n")
    client, _, pair = r.run(CURL_HTTP)
    assert pair is None and answer_and_close(client) == HTTP_503
    assert reason(r.records()[0]) == "loop"
    assert r.counters() == {"accepted": 1, "refused_loop": 1}


@pytest.mark.parametrize("protocol, data, answer", [("tls", CURL, b""), ("http", CURL_HTTP, HTTP_503)],
                         ids=["tls", "http"])
def test_connect_failure(rig, protocol, data, answer):
    r = rig([(NAME, f"127.0.0.1:{free_port()}")], protocol=protocol)
    client, _, _ = r.run(data)
    assert answer_and_close(client) == answer
    assert reason(r.records()[0]) == "connect_failed"
    assert r.counters() == {"accepted": 1, "refused_connect_failed": 1}


def test_failing_addresses_then_the_next(rig, backend):
    # TCP to a multicast address fails within connect(); nothing listens on 127.0.0.2,
    # which refuses once connect() returned.
    port = backend.port
    r = rig([(NAME, f"app.test:{port}")],
            resolver=FakeResolver(cache={"app.test": ["224.0.0.1", "127.0.0.2", "127.0.0.1"]}))
    _, _, pair = r.run(CURL)
    backend_got(backend.sock, CURL)
    pair.on_done(RelayResult(0, 0, "done"))
    assert r.records()[0]["backend"] == backend.address


def test_connect_timeout_then_the_next(rig, backend):
    """An address whose accept queue is full drops the SYN: the connect timeout moves on."""
    port = backend.port
    with socket.socket() as full:
        full.bind(("127.0.0.2", port))
        full.listen(0)
        fillers = [socket.socket() for _ in range(2)]
        for s in fillers:
            s.setblocking(False)
            s.connect_ex(("127.0.0.2", port))
        r = rig([(NAME, f"app.test:{port}")], extra="[timeouts]\nconnect = 0.2\n",
                resolver=FakeResolver(cache={"app.test": ["127.0.0.2", "127.0.0.1"]}))
        started = time.monotonic()
        _, _, pair = r.run(CURL)
        assert 0.15 <= time.monotonic() - started < 1.5   # libev times from its loop time, a little stale
        for s in fillers:
            s.close()
    backend_got(backend.sock, CURL)
    pair.on_done(RelayResult(0, 0, "done"))
    assert r.records()[0]["backend"] == backend.address


@pytest.mark.parametrize("pieces", [False, True], ids=["whole hello", "hello in pieces"])
def test_slow_connect_waits_and_sends_the_hello_once(rig, pieces):
    """A full accept queue drops the SYN, which TCP retries after about a second: the
    connection waits for the socket to become writable (having stopped waiting on the
    client, if the hello came in pieces), then sends once and stops waiting."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as slow:
        filler = socket.create_connection(slow.getsockname())    # takes the queue's one place
        r = rig([(NAME, "127.0.0.1:%d" % slow.getsockname()[1])],
                extra="[timeouts]\nclient_hello = 1.5\nconnect = 1.5\n")
        client, conn = r.connect(CURL[:100] if pieces else CURL)
        if pieces:
            gevent.sleep(0.05)
            client.sendall(CURL[100:])
        gevent.sleep(0.2)
        assert not conn.ended and r.relay.started == []          # still connecting
        slow.accept()[0].close()
        filler.close()
        pair = r.settle(conn)
        assert pair is not None, r.records()
        gevent.sleep(0.7)                      # past both timeouts: neither fires now
        assert len(r.relay.started) == 1 and not conn.ended
        backend_got(slow, CURL)
        pair.on_done(RelayResult(0, 0, "done"))


def test_connections_sharing_one_address_list_both_connect(rig, backend):
    """Regression: the resolver hands every waiter of a query the same list, and
    connecting must not consume it."""
    addresses = ["127.0.0.1"]
    port = backend.port
    r = rig([(NAME, f"app.test:{port}")], resolver=FakeResolver(cache={"app.test": addresses}))
    pairs = [r.run(CURL)[2] for _ in range(2)]
    assert None not in pairs, r.records()
    for pair in pairs:
        backend_got(backend.sock, CURL)
        pair.on_done(RelayResult(0, 0, "done"))
    assert addresses == ["127.0.0.1"]
    assert [rec["outcome"] for rec in r.records()] == ["done", "done"]
    assert r.counters() == {"accepted": 2, "relayed_userspace": 2, "bytes_up_userspace": 2 * len(CURL)}
