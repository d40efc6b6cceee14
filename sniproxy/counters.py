"""Worker counters in a shared, file-backed table that `sniproxy-master stats` reads.

Each worker owns one row (its spawn number modulo ROWS), so increments never
race across processes; the reader sums the rows.
"""
from __future__ import annotations

import functools
import mmap
import os
from pathlib import Path

REFUSAL_REASONS = (
    "access_denied",       # source address not allowed
    "malformed",           # first flight starts like the protocol but is broken
    "client_hello_timeout",
    "no_name",             # no usable name and no fallback
    "not_protocol",        # not TLS/HTTP and no fallback
    "no_route",            # name matched no route and no fallback
    "resolve_failed",
    "private_address",     # "*" backend resolved to a private address
    "loop",                # "*" backend resolved to one of the proxy's own listeners
    "proxy_untrusted",     # accept_proxy: the sender is not in trusted_sources
    "proxy_malformed",     # accept_proxy: a broken PROXY header, or none
    "connect_failed",
)
NAMES = (
    "accepted", "relayed_kernel", "relayed_userspace", "relayed_splice", "fallback",
    "bytes_up_userspace", "bytes_down_userspace", "slow_reader", "idle_timeout", "closed_early", "errors",
) + tuple(f"refused_{r}" for r in REFUSAL_REASONS) + (
    "kernel_maps_full",    # pairs the kernel relay could not take (bpf.max_pairs): relayed in userspace
    "dns_cache_hits", "dns_cache_misses",   # names of "*" or named backends: answered from the cache, or not
    # relay.policy = "auto": pairs moved to a relay after the first (a pair may move several times)
    "moved_to_copy", "moved_to_splice", "moved_to_kernel",
    "kernel_batched",      # times a kernel-relayed pair's verdict began to be batched (bpf.batch_bytes)
)
# Gauges: what a worker holds now, set (not added) once a second; read per live worker.
GAUGES = (
    "live_connections",
    "live_kernel_pairs",   # pairs the kernel relay watches (idle ones parked, without a greenlet)
    "loop_watchers",       # active event-loop watchers: io and timers
)
# By listener, in the order of the config's [[listener]] tables (the first LISTENER_SLOTS).
LISTENER_SLOTS = 16
PER_LISTENER = ("accepted", "relayed", "refused")


@functools.cache   # asked for every connection: a lookup, not a call that formats
def listener_counter(slot: int, what: str) -> str:
    return f"listener{slot}_{what}"


# The kernel relay's registration time (seconds), as a histogram: per-bucket counts (the
# last is +Inf) and the sum in microseconds.
REGISTRATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
REGISTRATION = tuple(f"registration_bucket{i}" for i in range(len(REGISTRATION_BUCKETS) + 1)) + \
    ("registration_sum_us",)

ROWS = 256
_WIDTH = 128                      # counters per row, room to grow without a new layout
_INDEX = {name: i for i, name in enumerate(
    NAMES + GAUGES + tuple(listener_counter(i, w) for i in range(LISTENER_SLOTS) for w in PER_LISTENER) +
    REGISTRATION)}
assert len(_INDEX) <= _WIDTH


class CounterTable:
    def __init__(self, path: str | Path, create: bool = False):
        size = ROWS * _WIDTH * 8
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:                    # a new master counts from zero
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._cells = memoryview(self._map).cast("Q")

    def row(self, number: int) -> "CounterRow":
        return CounterRow(self._cells, (number % ROWS) * _WIDTH)

    def totals(self, names: tuple[str, ...] = NAMES) -> dict[str, int]:
        return {name: sum(self._cells[r * _WIDTH + _INDEX[name]] for r in range(ROWS)) for name in names}

    def listener_totals(self, count: int) -> list[dict[str, int]]:
        """PER_LISTENER counts of the first `count` listeners."""
        slots = range(min(count, LISTENER_SLOTS))
        totals = self.totals(tuple(listener_counter(i, what) for i in slots for what in PER_LISTENER))
        return [{what: totals[listener_counter(i, what)] for what in PER_LISTENER} for i in slots]

    def gauges(self, number: int) -> dict[str, int]:
        base = (number % ROWS) * _WIDTH
        return {name: self._cells[base + _INDEX[name]] for name in GAUGES}


class CounterRow:
    __slots__ = ("_cells", "_base")

    def __init__(self, cells: memoryview, base: int):
        self._cells, self._base = cells, base

    def add(self, name: str, n: int = 1) -> None:
        self._cells[self._base + _INDEX[name]] += n

    def observe_registration(self, seconds: float) -> None:
        bucket = next((i for i, le in enumerate(REGISTRATION_BUCKETS) if seconds <= le), len(REGISTRATION_BUCKETS))
        self.add(REGISTRATION[bucket])
        self.add("registration_sum_us", round(seconds * 1e6))

    def set(self, name: str, value: int) -> None:
        self._cells[self._base + _INDEX[name]] = value
