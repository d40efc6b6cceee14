"""One client connection, from accept to close, driven by event-loop callbacks.

A connection has no greenlet of its own. Each step runs in the hub as a
callback (readable, writable, a timer), does what it can without waiting, and
arms a watcher for the rest: read the first flight, route, connect and send it,
then hand both sockets to the relay. A short connection mostly never waits at
all, and creating, switching to and ending a greenlet per connection cost more
than everything else it does. Steps that must block run in a greenlet: a DNS
query, and the kernel relay's watch over a registered pair.

A connection needs only its Context, which the worker builds once: what it
reads of its worker is named there. Every connection ends in exactly one
access-log record, with an outcome that is either "done"-like (from the relay)
or a refusal reason.
"""
from __future__ import annotations

import _socket
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import gevent

from . import proxy_protocol
from .accesslog import AccessLog
from .config import ListenerConfig, TimeoutsConfig, hostport_text
from .counters import CounterRow, listener_counter
from .firstflight import NEED_MORE, FirstFlight, Malformed, NotThisProtocol, parse_client_hello, parse_http_request
from .relay import STOWED, Limits, Relay, RelayResult
from .resolver import ResolveError, Resolver
from .routing import Refusal, Router
from .sourcefilter import SourceFilter

log = logging.getLogger("sniproxy.worker")

READ_SIZE = 16 * 1024
# Callbacks run one at a time, so one buffer serves the worker: a fresh 16 KiB
# per read costs an allocation (and here an mmap) each time.
_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)
_READ, _WRITE = 1, 2  # libev event masks
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)   # Linux 4.11; not in every Python
TLS_ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])
HTTP_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HTTP_MISDIRECTED = b"HTTP/1.1 421 Misdirected Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HTTP_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_PARSERS = {"tls": parse_client_hello, "http": parse_http_request}
# What a refusal says before the close, by listener protocol and reason; nothing where absent.
ANSWERS = {
    ("tls", "no_route"): TLS_ALERT_UNRECOGNIZED_NAME, ("tls", "no_name"): TLS_ALERT_UNRECOGNIZED_NAME,
    ("http", "no_route"): HTTP_MISDIRECTED, ("http", "no_name"): HTTP_MISDIRECTED,
    ("http", "malformed"): HTTP_BAD_REQUEST,
    **{("http", reason): HTTP_UNAVAILABLE for reason in ("resolve_failed", "private_address", "loop", "connect_failed")},
}


@dataclass(frozen=True, slots=True)
class Context:
    """What a connection needs of its worker; the worker builds it once."""
    loop: object                 # the gevent hub's loop
    counters: CounterRow
    source_filter: SourceFilter
    router: Router
    resolver: Resolver
    relay: Relay
    timeouts: TimeoutsConfig     # client_hello and connect
    limits: Limits               # the relay's: idle and half_closed
    allow_private: bool          # resolver.allow_private
    access_log: AccessLog
    ended: Callable[["Connection"], None]
    trusted: dict[str, SourceFilter] = field(default_factory=dict)   # accept_proxy listener -> its senders
    listener_slots: dict[str, int] = field(default_factory=dict)     # listener address -> its counters' slot


class Refused(Exception):
    """A connection turned away; reason is one of counters.REFUSAL_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ClosedEarly(Exception):
    """The client closed without sending a byte."""


class Connection:
    __slots__ = ("ctx", "lc", "client", "peer", "upstream", "record", "started", "data", "name", "choice",
                 "addresses", "unsent", "watcher", "timer", "ended", "awaiting_proxy", "tls")

    def __init__(self, ctx: Context, lc: ListenerConfig, client: _socket.socket, peer):
        self.ctx, self.lc, self.client, self.peer = ctx, lc, client, peer
        self.upstream: _socket.socket | None = None
        self.record = {"client": hostport_text(peer[0], peer[1]), "listener": lc.address, "name": "-", "alpn": "-",
                       "backend": "-", "up": 0, "down": 0, "relay": "-", "outcome": ""}
        self.started = time.monotonic()
        self.data = b""
        self.watcher = self.timer = None   # what a step before the relay waits on, and its deadline
        self.ended = False
        self.awaiting_proxy = lc.accept_proxy   # a PROXY header comes before the first flight
        self.tls = False        # the first flight was a ClientHello (relay.tls_fast_relay)

    def start(self) -> None:
        self.ctx.counters.add("accepted")
        count_listener(self.ctx, self.lc.address, "accepted")
        self._step(self._begin)

    # --- steps ----------------------------------------------------------------

    def _step(self, step, *args) -> None:
        """Run one step; a refusal or an error ends the connection there."""
        counters = self.ctx.counters
        try:
            step(*args)
            return
        except Refused as r:
            counters.add(f"refused_{r.reason}")
            count_listener(self.ctx, self.lc.address, "refused")
            self.record["outcome"] = f"refused:{r}"
            answer = ANSWERS.get((self.lc.protocol, r.reason))
            if answer:
                _send_quietly(self.client, answer)
        except ClosedEarly:
            counters.add("closed_early")
            self.record["outcome"] = "closed_early"
        except OSError as e:
            counters.add("errors")
            self.record["outcome"] = f"error:{e.__class__.__name__}:{e}"
        except Exception as e:  # noqa: BLE001 - a bug must not leave a watcher firing forever
            log.exception("connection from %s failed", self.record["client"])
            counters.add("errors")
            self.record["outcome"] = f"error:{e.__class__.__name__}:{e}"
        self._end()

    def _wait(self, fd: int, event: int, timeout: float, on_ready, on_timeout) -> None:
        """Run on_ready when fd is ready, or on_timeout after timeout seconds."""
        self._stop_waiting()
        loop = self.ctx.loop
        self.watcher, self.timer = loop.io(fd, event), loop.timer(timeout)
        self.watcher.start(self._step, on_ready)
        # From now, not from the loop's cached time: a long iteration would shorten the deadline.
        self.timer.start(self._step, on_timeout, update=True)

    def _stop_waiting(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.timer.close()
            self.watcher = self.timer = None

    def _begin(self) -> None:
        if self.awaiting_proxy:   # the source filter applies to the address the header carries
            if not self.ctx.trusted[self.lc.address].allows(self.peer[0]):
                raise Refused("proxy_untrusted", self.peer[0])
        elif not self.ctx.source_filter.allows(self.peer[0]):
            raise Refused("access_denied")
        self._read_first_flight()

    def _read_first_flight(self) -> None:
        """Read what has arrived and parse all of it; wait while the parser needs more.
        Clients send their first flight right after the handshake, so it has usually
        arrived by the time the connection is accepted."""
        parse = _PARSERS[self.lc.protocol]
        while True:
            try:
                n = self.client.recv_into(_READ_BUFFER, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if self.watcher is None:
                    self._wait(self.client.fileno(), _READ, self.ctx.timeouts.client_hello,
                               self._read_first_flight, self._client_hello_timeout)
                return
            if not n:
                if not self.data:         # a port probe or a client that gave up: not a refusal
                    raise ClosedEarly()
                raise Refused("malformed", "client closed before the first flight was complete")
            self.data += _READ_VIEW[:n]
            if self.awaiting_proxy and not self._take_proxy_header():
                continue
            try:
                flight = parse(self.data)
            except NotThisProtocol:
                flight = FirstFlight(None, (), f"not_{self.lc.protocol}")
            except Malformed as e:
                raise Refused("malformed", str(e)) from None
            if flight is not NEED_MORE:
                self._stop_waiting()
                return self._route(flight)

    def _take_proxy_header(self) -> bool:
        """The balancer's PROXY header, off the front of data: from here on the client is
        the address it carries. False while it is incomplete, or all that arrived."""
        try:
            received = proxy_protocol.parse(self.data)
        except Malformed as e:
            raise Refused("proxy_malformed", str(e)) from None
        if received is NEED_MORE:
            return False
        self.data, self.awaiting_proxy = self.data[received.length:], False
        if received.source is not None:
            self.peer = received.source
            self.record["client"] = hostport_text(received.source[0], received.source[1])
        if not self.ctx.source_filter.allows(self.peer[0]):
            raise Refused("access_denied")
        return bool(self.data)

    @staticmethod
    def _client_hello_timeout() -> None:
        raise Refused("client_hello_timeout")

    def _route(self, flight: FirstFlight) -> None:
        ctx, record = self.ctx, self.record
        record["name"] = flight.name or f"({flight.name_problem})"
        record["alpn"] = ",".join(flight.alpn) or "-"
        self.name = flight.name
        self.tls = self.lc.protocol == "tls" and flight.name_problem != "not_tls"
        choice = ctx.router.choose(self.lc, flight)
        if isinstance(choice, Refusal):
            raise Refused(choice.reason, choice.detail)
        if choice.fallback:
            ctx.counters.add("fallback")
        self.choice = choice
        if choice.backend.is_ip:
            return self._connect([choice.host])
        addresses = ctx.resolver.cached(choice.host)
        if addresses is None:   # a DNS query: the one step that blocks
            gevent.spawn(self._step, self._resolve)
        else:
            self._connect(self._permitted(addresses))

    def _resolve(self) -> None:
        try:
            addresses = self.ctx.resolver.resolve(self.choice.host)
        except ResolveError as e:
            raise Refused("resolve_failed", str(e)) from None
        self._connect(self._permitted(addresses))

    def _permitted(self, addresses: list[str]) -> list[str]:
        permitted = self.ctx.router.permitted(self.choice, addresses, self.ctx.allow_private)
        if isinstance(permitted, Refusal):
            raise Refused(permitted.reason, permitted.detail)
        return permitted

    def _connect(self, addresses: list[str]) -> None:
        self.addresses = list(addresses)   # ours to consume: the waiters of one DNS query share its list
        self._connect_next(None)

    def _connect_next(self, error: OSError | None) -> None:
        """Connect to each address in turn (IP literals: no getaddrinfo round trip) and
        send the first flight at once. When the handshake completed within connect()
        (loopback, a near backend) it goes out without a wait for writability; a socket
        still connecting answers EAGAIN, and a failed connect surfaces as the send's error."""
        port = self.choice.backend.port
        while self.addresses:
            address = self.addresses.pop(0)
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.choice.fastopen:
                    # connect() sends nothing, and the first flight's send goes out as SYN and data
                    # (once the kernel holds the backend's cookie; until then a SYN asks for one).
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
                else:
                    # The handshake's last ACK waits to ride with the first flight: one packet
                    # and one wakeup fewer for the backend (HAProxy's tcp-smart-connect).
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 0)
                err = sock.connect_ex((address, port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
            except OSError as e:
                sock.close()
                error = e
                continue
            self.upstream = sock
            self.record["backend"] = hostport_text(address, port)
            self.unsent = memoryview(self._proxy_header() + self.data if self.choice.proxy_protocol else self.data)
            return self._send_first_flight()
        raise Refused("connect_failed", f"{self.choice.host}:{port}: {error}")

    def _proxy_header(self) -> bytes:
        """The route's PROXY protocol header, ahead of the first flight: the client's
        address, and the address it connected to."""
        return proxy_protocol.header(self.choice.proxy_protocol, self.peer, self.client.getsockname(), self.name)

    def _send_first_flight(self) -> None:
        try:
            while self.unsent:
                self.unsent = self.unsent[self.upstream.send(self.unsent, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            if self.watcher is None:
                self._wait(self.upstream.fileno(), _WRITE, self.ctx.timeouts.connect,
                           self._send_first_flight, self._connect_timeout)
            return
        except OSError as e:
            return self._next_address(e)
        if self.choice.fastopen and self.watcher is None:
            # Fast Open's send returns once the SYN carries the first flight, before the backend
            # answered. Wait for the handshake: a backend that refuses is found out here, where
            # the next address can still be tried, and not as a reset in the relay.
            return self._wait(self.upstream.fileno(), _WRITE, self.ctx.timeouts.connect,
                              self._handshake_done, self._connect_timeout)
        self._connected()

    def _handshake_done(self) -> None:
        error = self.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            return self._next_address(OSError(error, os.strerror(error)))
        self._connected()

    def _connected(self) -> None:
        # ... and from here on, ACKs go at once again: left delayed, a backend's small
        # writes would wait for them behind Nagle.
        self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        self._stop_waiting()
        self._relay()

    def _connect_timeout(self) -> None:
        self._next_address(socket.timeout("timed out"))

    def _next_address(self, error: OSError) -> None:
        self._stop_waiting()
        self.upstream.close()
        self.upstream = None
        self._connect_next(error)

    def _relay(self) -> None:
        self.record["up"] = len(self.data)
        # What led here is not needed any more: a ClientHello (KiBs, with post-quantum key
        # shares) would otherwise stay with the connection for as long as it lives, and
        # the rest with each of thousands of idle ones.
        self.data = self.unsent = self.addresses = self.choice = self.peer = None
        self.ctx.relay.start(self.client, self.upstream, self.ctx.limits, self._relayed, record=self.record,
                             tls=self.tls)

    def _relayed(self, result: RelayResult) -> None:
        if result.outcome == STOWED:   # the kernel relay ends it, and the worker logs it then
            self.ended = True
            return self.ctx.ended(self)
        count_relayed(self.ctx, self.record, result, up_before=self.record["up"])
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._stop_waiting()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.record["duration"] = time.monotonic() - self.started
        self.ctx.access_log.write(self.record)
        self.ctx.ended(self)


def count_listener(ctx: Context, listener: str, what: str) -> None:
    slot = ctx.listener_slots.get(listener)
    if slot is not None:
        ctx.counters.add(listener_counter(slot, what))


def count_relayed(ctx: Context, record: dict, result: RelayResult, up_before: int, down_before: int = 0) -> None:
    """Count a relayed connection and complete its log record; also for a pair that
    began in another worker (keeper.py). up_before and down_before: bytes moved in
    userspace before `result` began (the first flight at least)."""
    counters = ctx.counters
    counters.add(f"relayed_{result.kind}")
    count_listener(ctx, record["listener"], "relayed")
    # The kernel counts what it redirected (RELAY_STATS); these count the rest.
    counters.add("bytes_up_userspace", up_before + result.up - result.kernel_up)
    counters.add("bytes_down_userspace", down_before + result.down - result.kernel_down)
    if result.outcome in ("slow_reader", "idle_timeout"):
        counters.add(result.outcome)
    record.update(up=up_before + result.up, down=down_before + result.down, relay=result.kind, outcome=result.outcome)


def _send_quietly(sock: _socket.socket, data: bytes) -> None:
    """A refusal's answer: a few bytes that fit any send buffer, so never a wait."""
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass
