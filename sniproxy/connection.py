"""One client connection, from accept to close.

Every connection ends in exactly one access-log record, with an outcome that
is either "done"-like (from the relay) or a refusal reason.
"""
from __future__ import annotations

import _socket
import errno
import os
import socket
import time
from typing import TYPE_CHECKING

import gevent
import gevent.socket

from .config import HostPort, ListenerConfig
from .firstflight import NEED_MORE, FirstFlight, Malformed, NotThisProtocol, parse_client_hello, parse_http_request
from .relay import send_all
from .resolver import ResolveError, is_public

if TYPE_CHECKING:
    from .worker import Worker

READ_SIZE = 16 * 1024
_READ_BUFFER = bytearray(READ_SIZE)
_READ_VIEW = memoryview(_READ_BUFFER)
TLS_ALERT_UNRECOGNIZED_NAME = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70])
HTTP_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HTTP_MISDIRECTED = b"HTTP/1.1 421 Misdirected Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
HTTP_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_PARSERS = {"tls": parse_client_hello, "http": parse_http_request}


class Refused(Exception):
    """A connection turned away; reason is one of counters.REFUSAL_REASONS."""

    def __init__(self, reason: str, detail: str = "", answer: bytes = b""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.answer = reason, answer


class ClosedEarly(Exception):
    """The client closed without sending a byte."""


def serve_connection(worker: "Worker", lc: ListenerConfig, client: _socket.socket, peer) -> dict:
    record = {"client": _fmt_peer(peer), "listener": lc.address, "name": "-", "alpn": "-",
              "backend": "-", "up": 0, "down": 0, "relay": "-", "outcome": ""}
    upstream = None
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not worker.access.allows(peer[0]):
            raise Refused("access_denied")
        data, flight = read_first_flight(client, lc.protocol, worker.cfg.timeouts.client_hello)
        record["name"] = flight.name or f"({flight.name_problem})"
        record["alpn"] = ",".join(flight.alpn) or "-"
        backend, fallback = choose_backend(worker, lc, flight)
        if fallback:
            worker.counters.add("fallback")
        upstream, address = connect_backend(worker, lc, backend, flight.name, data)
        record["backend"] = address
        record["up"] = len(data)
        timeouts = worker.cfg.timeouts
        result = worker.relay.relay(client, upstream, timeouts.idle, timeouts.half_closed)
        kind = result.kind
        worker.counters.add(f"relayed_{kind}")
        # The kernel counts what it redirected (RELAY_STATS); these count the rest.
        worker.counters.add("bytes_up_userspace", len(data) + result.up - result.kernel_up)
        worker.counters.add("bytes_down_userspace", result.down - result.kernel_down)
        if result.outcome in ("slow_reader", "idle_timeout"):
            worker.counters.add(result.outcome)
        record.update(up=len(data) + result.up, down=result.down, relay=kind, outcome=result.outcome)
    except Refused as r:
        worker.counters.add(f"refused_{r.reason}")
        record["outcome"] = f"refused:{r}"
        if r.answer:
            _send_quietly(client, r.answer)
    except ClosedEarly:
        worker.counters.add("closed_early")
        record["outcome"] = "closed_early"
    except (OSError, gevent.Timeout) as e:
        worker.counters.add("errors")
        record["outcome"] = f"error:{e.__class__.__name__}:{e}"
    finally:
        client.close()
        if upstream is not None:
            upstream.close()
    return record


def read_first_flight(client: _socket.socket, protocol: str, timeout: float) -> tuple[bytes, FirstFlight]:
    """Read until the parser has a result; NotThisProtocol yields a nameless flight.
    The first read seldom waits: clients send their first flight right after the
    handshake, so it has usually arrived by the time the connection is accepted."""
    parse = _PARSERS[protocol]
    data = b""
    deadline = None
    while True:
        try:
            # Into a worker-wide buffer, copied out before any other greenlet runs:
            # a fresh 16 KiB per read costs an allocation (and here an mmap) each time.
            n = client.recv_into(_READ_BUFFER, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            if deadline is None:
                deadline = time.monotonic() + timeout
            try:
                gevent.socket.wait_read(client.fileno(), max(deadline - time.monotonic(), 0.0))
            except socket.timeout:
                raise Refused("client_hello_timeout") from None
            continue
        if not n:
            if not data:              # a port probe or a client that gave up: not a refusal
                raise ClosedEarly()
            raise Refused("malformed", "client closed before the first flight was complete")
        data += _READ_VIEW[:n]
        try:
            result = parse(data)
        except NotThisProtocol:
            return data, FirstFlight(None, (), f"not_{protocol}")
        except Malformed as e:
            raise Refused("malformed", str(e), HTTP_BAD_REQUEST if protocol == "http" else b"") from None
        if result is not NEED_MORE:
            return data, result


def choose_backend(worker: "Worker", lc: ListenerConfig, flight: FirstFlight) -> tuple[HostPort, bool]:
    """The route's backend, or the listener's fallback; (backend, used_fallback)."""
    route = worker.router.lookup(lc.table, flight.name) if flight.name else None
    if route is not None:
        return route.backend, False
    fallback = worker.fallbacks[id(lc)]
    if fallback is not None:
        return fallback, True
    if flight.name is not None:
        reason = "no_route"
    else:
        reason = "not_protocol" if flight.name_problem.startswith("not_") else "no_name"
    answer = TLS_ALERT_UNRECOGNIZED_NAME if lc.protocol == "tls" else HTTP_MISDIRECTED
    if reason == "not_protocol":
        answer = b""
    raise Refused(reason, flight.name or flight.name_problem, answer)


def connect_backend(worker: "Worker", lc: ListenerConfig, backend: HostPort, name: str | None,
                    first_flight: bytes):
    """Resolve (if needed), connect and send the first flight, trying each address in order."""
    unavailable = HTTP_UNAVAILABLE if lc.protocol == "http" else b""
    host = name if backend.host == "*" else backend.host
    if backend.is_ip:
        addresses = [backend.host]
    else:
        try:
            addresses = worker.resolver.resolve(host)
        except ResolveError as e:
            raise Refused("resolve_failed", str(e), unavailable) from None
        if backend.host == "*" and not worker.cfg.resolver.allow_private:
            addresses = [a for a in addresses if is_public(a)]
            if not addresses:
                raise Refused("private_address", host, unavailable)
    error = None
    for address in addresses:
        try:
            upstream = _connect(address, backend.port, first_flight, worker.cfg.timeouts.connect)
            return upstream, str(HostPort(address, backend.port))
        except OSError as e:
            error = e
    raise Refused("connect_failed", f"{host}:{backend.port}: {error}", unavailable)


def _connect(address: str, port: int, first_flight: bytes, timeout: float) -> _socket.socket:
    """Connect to an IP literal (no getaddrinfo round trip through a thread pool) and
    send the first flight, on a non-blocking C socket. The send is tried at once: when
    the handshake completed within connect() (loopback, a near backend) it goes out
    without a wait for writability; on a socket still connecting it meets EAGAIN and
    waits, and a failed connect surfaces as the send's error."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        send_all(sock, first_flight, timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _send_quietly(sock: _socket.socket, data: bytes) -> None:
    """A refusal's answer: a few bytes that fit any send buffer, so never a wait."""
    try:
        sock.send(data, socket.MSG_DONTWAIT)
    except OSError:
        pass


def _fmt_peer(peer) -> str:
    return str(HostPort(peer[0], peer[1]))
