"""Name resolution for backends, with dnspython and a TTL-respecting cache.

The cache is either a per-process dict or the DNS_CACHE map pinned by the
master, which every worker shares (see dns_cache.py); both have get/put.
Concurrent lookups of one name in a worker share a single query.
"""
from __future__ import annotations

import ipaddress
import logging

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver
import gevent.event

from .config import ResolverConfig, parse_hostport

log = logging.getLogger(__name__)

_ORDER = {
    "ipv4_only": ("A",),
    "ipv6_only": ("AAAA",),
    "ipv4_first": ("A", "AAAA"),
    "ipv6_first": ("AAAA", "A"),
}
_LOCALHOST = {"localhost": ["127.0.0.1", "::1"]}
MIN_TTL = 1.0


class ResolveError(Exception):
    pass


_NAT64 = ipaddress.ip_network("64:ff9b::/96")          # RFC 6052: the IPv4 address is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: local-use translators
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")       # deprecated ::a.b.c.d


def is_public(address: str) -> bool:
    """False for loopback, private, link-local, unspecified, multicast, broadcast, shared
    (100.64.0.0/10), reserved and documentation ranges, and for an IPv6 address that
    carries such an IPv4 address (mapped, compatible or NAT64): a "*" backend must
    never lead into the network behind the proxy."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6:
        if ip in _NAT64_LOCAL:
            return False
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class Resolver:
    def __init__(self, cfg: ResolverConfig, cache, timeout: float = 5.0, counters=None):
        self.order = _ORDER[cfg.mode]
        self.cache = cache
        self.counters = counters  # the worker's CounterRow: cache hits and misses
        self.queries = 0          # sent to a DNS server; the tests count these
        self._inflight: dict[str, gevent.event.AsyncResult] = {}
        self._dns = dns.resolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            self._dns.nameservers = [
                dns.nameserver.Do53Nameserver(hp.host, hp.port)
                for hp in (parse_hostport(ns, default_port=53) for ns in cfg.nameservers)
            ]
        self._dns.lifetime = timeout

    def cached(self, name: str) -> list[str] | None:
        """Addresses for name known without a query, else None (a cache hit or miss:
        a connection asks this first, and resolve() only on a miss)."""
        known = self._known(name)
        if self.counters is not None:
            self.counters.add("dns_cache_hits" if known is not None else "dns_cache_misses")
        return known

    def _known(self, name: str) -> list[str] | None:
        if name in _LOCALHOST:
            return [a for fam in self.order for a in _LOCALHOST[name] if (":" in a) == (fam == "AAAA")]
        return self.cache.get(name)

    def resolve(self, name: str) -> list[str]:
        """Addresses for name, in the configured family order; raise ResolveError."""
        cached = self._known(name)
        if cached is not None:
            return cached
        pending = self._inflight.get(name)
        if pending is not None:
            return pending.get()
        pending = self._inflight[name] = gevent.event.AsyncResult()
        try:
            addresses = self._query(name)
            pending.set(addresses)
            return addresses
        except ResolveError as e:
            pending.set_exception(e)
            raise
        finally:
            del self._inflight[name]

    def _query(self, name: str) -> list[str]:
        addresses: list[str] = []
        ttl = None
        for rdtype in self.order:
            self.queries += 1
            try:
                answer = self._dns.resolve(name, rdtype, search=False)
            except dns.resolver.NXDOMAIN:
                raise ResolveError(f"{name}: no such domain") from None
            except (dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            except dns.exception.DNSException as e:
                raise ResolveError(f"{name}: {e.__class__.__name__}: {e}") from None
            addresses += [r.address for r in answer]
            ttl = answer.rrset.ttl if ttl is None else min(ttl, answer.rrset.ttl)
            break   # with *_first, the second family is only a fallback
        if not addresses:
            raise ResolveError(f"{name}: no {'/'.join(self.order)} records")
        self.cache.put(name, addresses, max(float(ttl or 0), MIN_TTL))
        return addresses
