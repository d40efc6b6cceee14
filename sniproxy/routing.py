"""Routing: a listener and a first flight to a backend, or a refusal with its reason.

Each listener's table is ordered and the first match wins; a first flight with
no usable name, or a name that matches no route, goes to the listener's
fallback when it has one.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Callable, NamedTuple

from .config import Config, HostPort, ListenerConfig, RouteConfig, parse_hostport
from .firstflight import FirstFlight
from .resolver import is_public


@dataclass(frozen=True, slots=True)
class Route:
    pattern: str
    backend: HostPort      # host "*" means: resolve the requested name itself
    matches: Callable[[str], bool]
    alpn: frozenset[str] = frozenset()   # the hello must offer one of these; empty: any
    proxy_protocol: str = ""             # "", "v1" or "v2"
    fastopen: bool = False               # connect with TCP Fast Open

    def takes(self, flight: FirstFlight) -> bool:
        return self.matches(flight.name) and (not self.alpn or not self.alpn.isdisjoint(flight.alpn))

    @property
    def resolves_requested_name(self) -> bool:
        return self.backend.host == "*"


class Choice(NamedTuple):
    backend: HostPort
    host: str                # what to connect to: an IP literal, or a name to resolve
    public_only: bool        # the requested name itself is resolved: only public addresses may do
    fallback: bool           # the listener's fallback, not a route
    proxy_protocol: str = "" # "", "v1" or "v2": a PROXY header goes first
    fastopen: bool = False   # the first flight rides the SYN (TCP Fast Open)


class Refusal(NamedTuple):
    reason: str              # one of counters.REFUSAL_REASONS: no_route | no_name | not_protocol
    detail: str


def compile_matcher(pattern: str) -> Callable[[str], bool]:
    """Names arrive normalized (lower-case, no trailing dot)."""
    if pattern.startswith("~"):
        return re.compile(pattern[1:], re.IGNORECASE).fullmatch
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]                      # ".example.com": any subdomain, not the apex
        return lambda name: name.endswith(suffix)
    return pattern.__eq__


def compile_route(route: RouteConfig) -> Route:
    return Route(route.match, parse_hostport(route.backend), compile_matcher(route.match), frozenset(route.alpn),
                 route.proxy_protocol, route.fastopen)


class Router:
    """The compiled tables and listener fallbacks of one config."""

    def __init__(self, cfg: Config):
        self.tables = {name: tuple(map(compile_route, routes)) for name, routes in cfg.table.items()}
        self.fallbacks = {lc.address: Route("(fallback)", parse_hostport(lc.fallback), bool)
                          for lc in cfg.listener if lc.fallback}
        self.listening = {_endpoint(hp.host, hp.port) for hp in (parse_hostport(lc.address) for lc in cfg.listener)}

    def lookup(self, table: str, flight: FirstFlight) -> Route | None:
        for route in self.tables[table]:
            if route.takes(flight):
                return route
        return None

    def choose(self, listener: ListenerConfig, flight: FirstFlight) -> Choice | Refusal:
        route = self.lookup(listener.table, flight) if flight.name else None
        fallback = route is None
        if fallback:
            route = self.fallbacks.get(listener.address)
            if route is not None and route.resolves_requested_name and flight.name is None:
                route = None   # a "*" fallback, and no name to resolve
        if route is None:
            if flight.name is not None:
                return Refusal("no_route", flight.name)
            return Refusal("not_protocol" if flight.name_problem.startswith("not_") else "no_name",
                           flight.name_problem)
        if route.resolves_requested_name:
            return Choice(route.backend, flight.name, True, fallback, route.proxy_protocol, route.fastopen)
        return Choice(route.backend, route.backend.host, False, fallback, route.proxy_protocol, route.fastopen)

    def permitted(self, choice: Choice, addresses: list[str], allow_private: bool) -> list[str] | Refusal:
        """Of a resolved name's addresses, those a connection may go to. For a "*" backend
        (the requested name itself): public ones only, unless allow_private, and never one
        of this proxy's own listeners."""
        if not choice.public_only:
            return addresses
        port = choice.backend.port
        addresses = [a for a in addresses if not self.loops_back(a, port)]
        if not addresses:
            return Refusal("loop", choice.host)
        if not allow_private:
            addresses = [a for a in addresses if is_public(a)]
            if not addresses:
                return Refusal("private_address", choice.host)
        return addresses

    def loops_back(self, address: str, port: int) -> bool:
        """Is address:port one of this proxy's own listeners? (A "*" name that resolves
        there would make the proxy connect to itself, over and over.)"""
        endpoint = _endpoint(address, port)
        if endpoint in self.listening:
            return True
        unspecified = ipaddress.ip_address("::" if endpoint[0].version == 6 else "0.0.0.0")
        return (unspecified, port) in self.listening and _is_local(str(endpoint[0]))


def _endpoint(host: str, port: int) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip = ipaddress.ip_address(host)
    return (ip.ipv4_mapped or ip if ip.version == 6 else ip), port


def _is_local(address: str) -> bool:
    """An address of this host: one a socket can bind."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True
