"""DNS caches: the pinned DNS_CACHE shared across processes, and the per-process fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from sniproxy import bpfload
from sniproxy.bpfsys import PinnedMap
from sniproxy.dns_cache import LocalDnsCache, PinnedDnsCache, cache_key, encode_entry, now_ns

CACHE_SIZE = 64
ADDRESSES = ["198.18.7.1", "198.18.7.2", "fd53:6e69:7072::7"]


@pytest.fixture
def pins(pin_path):
    loaded = bpfload.load(pin_path, programs=("dns_cache",), cflags={"DNS_CACHE_SIZE": CACHE_SIZE})
    try:
        yield pin_path
    finally:
        loaded.unpin()


@pytest.fixture(params=["pinned", "local"])
def cache(request):
    if request.param == "local":
        return LocalDnsCache(CACHE_SIZE)
    return PinnedDnsCache(request.getfixturevalue("pins"))


def in_other_process(pin_path: str, code: str):
    """Run code with `cache` bound to a PinnedDnsCache in a fresh interpreter; return its JSON output."""
    script = f"import json, sys\nfrom sniproxy.dns_cache import PinnedDnsCache\ncache = PinnedDnsCache(sys.argv[1])\n{code}"
    result = subprocess.run([sys.executable, "-c", script, pin_path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_miss_then_hit_case_insensitively(cache):
    assert cache.get("example.com") is None
    cache.put("Example.COM.", ADDRESSES, ttl=60)
    assert cache.get("example.com") == ADDRESSES
    assert cache.get("EXAMPLE.com.") == ADDRESSES
    assert cache.get("example.org") is None


def test_expiry(cache):
    cache.put("short.example", ADDRESSES, ttl=0.3)
    cache.put("gone.example", ADDRESSES, ttl=0)
    assert cache.get("short.example") == ADDRESSES
    assert cache.get("gone.example") is None
    time.sleep(0.4)
    assert cache.get("short.example") is None


def test_put_replaces(cache):
    cache.put("moved.example", ["198.18.0.1"], ttl=60)
    cache.put("moved.example", ["198.18.0.2"], ttl=60)
    assert cache.get("moved.example") == ["198.18.0.2"]


def test_pinned_keeps_family_order_and_four_per_family(pins):
    cache = PinnedDnsCache(pins)
    v6 = [f"fd53:6e69:7072::{i}" for i in range(1, 7)]
    v4 = [f"198.18.9.{i}" for i in range(1, 7)]
    cache.put("many.example", v6 + v4, ttl=60)
    assert cache.get("many.example") == v6[:4] + v4[:4]
    cache.put("many.example", v4 + v6, ttl=60)
    assert cache.get("many.example") == v4[:4] + v6[:4]


def test_two_processes_share_entries(pins):
    PinnedDnsCache(pins).put("from-parent.example", ADDRESSES, ttl=60)
    seen = in_other_process(pins, """
print(json.dumps(cache.get("FROM-PARENT.example")))
cache.put("from-child.example", ["198.18.5.5", "fd53:6e69:7072::5"], 60)
""")
    assert seen == ADDRESSES
    assert PinnedDnsCache(pins).get("from-child.example") == ["198.18.5.5", "fd53:6e69:7072::5"]


def test_other_process_respects_expiry(pins):
    PinnedDnsCache(pins).put("brief.example", ADDRESSES, ttl=0.2)
    time.sleep(0.3)
    assert in_other_process(pins, 'print(json.dumps(cache.get("brief.example")))') is None


def test_hash_collision_is_rejected(pins):
    # A value stored under a.example's key but naming another host, as a
    # colliding 64-bit hash would leave it.
    cache_map = PinnedMap.open(os.path.join(pins, "DNS_CACHE"))
    forged = encode_entry("b.example", ["198.18.6.6"], now_ns() + 60 * 10**9)
    cache_map.update(cache_key("a.example"), forged)
    assert PinnedDnsCache(pins).get("a.example") is None
    assert cache_map.lookup(cache_key("a.example")) is not None


def test_lru_bound_holds_at_cache_size(pins):
    cache = PinnedDnsCache(pins)
    names = [f"host{i}.example" for i in range(CACHE_SIZE * 4)]
    for name in names:
        cache.put(name, ["198.18.1.1"], ttl=60)
    stored = len(list(PinnedMap.open(os.path.join(pins, "DNS_CACHE")).keys()))
    assert CACHE_SIZE // 2 <= stored <= CACHE_SIZE
    assert cache.get(names[-1]) == ["198.18.1.1"]
    assert cache.get(names[0]) is None


def test_local_cache_evicts_least_recently_used():
    cache = LocalDnsCache(2)
    cache.put("a.example", ["198.18.0.1"], 60)
    cache.put("b.example", ["198.18.0.2"], 60)
    assert cache.get("a.example") == ["198.18.0.1"]   # now b is the oldest
    cache.put("c.example", ["198.18.0.3"], 60)
    assert cache.get("b.example") is None
    assert cache.get("a.example") == ["198.18.0.1"] and cache.get("c.example") == ["198.18.0.3"]


def bpftool_json(*args: str):
    return json.loads(subprocess.run(["bpftool", "-j", *args], check=True,
                                     capture_output=True, text=True).stdout)


def test_bpftool_sees_an_lru_hash_with_named_fields(pins):
    PinnedDnsCache(pins).put("shown.example", ["198.18.3.4"], ttl=60)
    path = os.path.join(pins, "DNS_CACHE")
    shown = bpftool_json("map", "show", "pinned", path)
    assert shown["type"] == "lru_hash" and shown["name"] == "DNS_CACHE"
    assert shown["max_entries"] == CACHE_SIZE
    (entry,) = bpftool_json("map", "dump", "pinned", path)
    value = entry["formatted"]["value"]  # present only when the map carries BTF
    assert value["name"] == "shown.example"
    assert value["v4_count"] == 1 and value["v4"][0] == [198, 18, 3, 4]
