"""Caches of resolved backend addresses, with one interface: get(name), put(name, addresses, ttl).

PinnedDnsCache keeps entries in the DNS_CACHE lru_hash pinned by the master,
so every worker shares them (layout: bpf/dns_cache.c). LocalDnsCache is a
per-process dict for when BPF is off. get() returns None on a miss, on an
expired entry and, for the pinned map, on a hash collision.
"""
from __future__ import annotations

import collections
import hashlib
import ipaddress
import os
import time

from .bpfsys import PinnedMap
from .kernel_abi import DNS_ADDRS_PER_FAMILY as ADDRS_PER_FAMILY
from .kernel_abi import DNS_CACHE, DNS_ENTRY, DNS_NAME_MAX


def normalize(name: str) -> str:
    return name.rstrip(".").lower()


def cache_key(name: str) -> bytes:
    """The 64-bit DNS_CACHE key: BLAKE2b-8 of the normalized name, stable across processes."""
    return hashlib.blake2b(normalize(name).encode(), digest_size=8).digest()


def now_ns() -> int:
    # CLOCK_BOOTTIME is shared by every process and never jumps like wall time.
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


def encode_entry(name: str, addresses: list[str], expires_ns: int) -> bytes:
    """Pack up to four addresses of each family, keeping which family came first."""
    parsed = [ipaddress.ip_address(a) for a in addresses]
    v4 = [a.packed for a in parsed if a.version == 4][:ADDRS_PER_FAMILY]
    v6 = [a.packed for a in parsed if a.version == 6][:ADDRS_PER_FAMILY]
    v6_first = bool(parsed) and parsed[0].version == 6
    return DNS_ENTRY.pack(normalize(name).encode()[:DNS_NAME_MAX], expires_ns,
                          len(v4), len(v6), v6_first, b"".join(v4), b"".join(v6))


def decode_entry(value: bytes) -> tuple[bytes, int, list[str]]:
    """(stored name, expiry in CLOCK_BOOTTIME ns, addresses) of a DNS_CACHE value."""
    name, expires_ns, n4, n6, v6_first, v4, v6 = DNS_ENTRY.unpack(value)
    v4s = [str(ipaddress.IPv4Address(v4[i * 4:i * 4 + 4])) for i in range(min(n4, ADDRS_PER_FAMILY))]
    v6s = [str(ipaddress.IPv6Address(v6[i * 16:i * 16 + 16])) for i in range(min(n6, ADDRS_PER_FAMILY))]
    return name.rstrip(b"\0"), expires_ns, (v6s + v4s if v6_first else v4s + v6s)


class PinnedDnsCache:
    """The DNS_CACHE map under pin_path, shared by all processes that open it."""

    def __init__(self, pin_path: str):
        self.map = PinnedMap.open(os.path.join(pin_path, DNS_CACHE))

    def get(self, name: str) -> list[str] | None:
        value = self.map.lookup(cache_key(name))
        if value is None:
            return None
        stored_name, expires_ns, addresses = decode_entry(bytes(value))
        if stored_name != normalize(name).encode()[:DNS_NAME_MAX]:
            return None  # another name with the same 64-bit hash
        if expires_ns <= now_ns():
            return None
        return addresses

    def put(self, name: str, addresses: list[str], ttl: float) -> None:
        expires_ns = now_ns() + int(ttl * 1e9)
        self.map.update(cache_key(name), encode_entry(name, addresses, expires_ns))


class LocalDnsCache:
    """A per-process TTL dict, bounded like the map: the least recently used entry goes first."""

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self.entries: collections.OrderedDict[str, tuple[float, list[str]]] = collections.OrderedDict()

    def get(self, name: str) -> list[str] | None:
        key = normalize(name)
        entry = self.entries.get(key)
        if entry is None:
            return None
        expires, addresses = entry
        if expires <= time.monotonic():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return list(addresses)

    def put(self, name: str, addresses: list[str], ttl: float) -> None:
        key = normalize(name)
        self.entries[key] = (time.monotonic() + ttl, list(addresses))
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
