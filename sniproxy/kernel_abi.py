"""The kernel ABI: every pinned name, map value layout and program type of bpf/*.c,
declared once for Python. The loader, the relays, the DNS cache, the XDP rules,
`stats` and the tests all read them from here; a test checks each layout's size
against the value size of the map the loader pinned.

Bump LAYOUT_VERSION whenever a layout or a pinned name changes: the loader
refuses to reuse pins of another version (see bpfload.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

LAYOUT_VERSION = 5

# --- bpf/relay.c ---------------------------------------------------------------
SOCK_MAP = "SOCK_MAP"              # sockhash: socket cookie -> socket; relay_verdict runs here
SOCK_TARGETS = "SOCK_TARGETS"      # the same sockets, without programs: redirect targets
CONNECTION_MAP = "CONNECTION_MAP"  # hash: cookie -> struct connection
RELAY_CONTROL = "RELAY_CONTROL"    # hash: cookie -> struct relay_control (backpressure)
RELAY_STATS = "RELAY_STATS"        # per-CPU array[1] of struct relay_stats
RELAY_PROGRAM = "relay_verdict"

COOKIE = struct.Struct("<Q")       # sockhash keys and values: the socket cookie, the fd on update
SO_COOKIE = 57                     # getsockopt(SOL_SOCKET, SO_COOKIE): the 8-byte key of a socket


class Connection(NamedTuple):
    """struct connection: one socket's side of a pair, as the verdict counts it."""
    peer: int        # cookie of the socket its bytes go to
    bytes: int       # received and redirected to the peer
    skbs: int
    passed: int      # received while paused: kept on the socket for userspace
    direction: int   # DIRECTION_UP or DIRECTION_DOWN
    next_seq: int = 0  # TCP sequence number of the next new byte (once SEQ_KNOWN)
    trimmed: int = 0   # bytes received twice and cut off by the verdict
    flags: int = 0     # CONNECTION_SEQ_KNOWN | CONNECTION_BROKEN

    LAYOUT = struct.Struct("<QQQQIIQI4x")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> "Connection":
        return cls._make(cls.LAYOUT.unpack(raw))


DIRECTION_UP, DIRECTION_DOWN = 1, 2   # enum relay_direction: client->upstream, upstream->client
CONNECTION_SEQ_KNOWN, CONNECTION_BROKEN = 1, 2   # enum connection_flags


class RelayControl(NamedTuple):
    """struct relay_control: a paused or resuming direction (no entry: relaying)."""
    mode: int        # MODE_PAUSED or MODE_RESUMING
    forwarded: int   # of the kept bytes, how many userspace has sent on

    LAYOUT = struct.Struct("<I4xQ")

    def pack(self) -> bytes:
        return self.LAYOUT.pack(*self)

    @classmethod
    def unpack(cls, raw: bytes) -> "RelayControl":
        return cls._make(cls.LAYOUT.unpack(raw))


MODE_PAUSED, MODE_RESUMING = 1, 2

# --- bpf/dns_cache.c -------------------------------------------------------------
DNS_CACHE = "DNS_CACHE"
DNS_NAME_MAX = 128
DNS_ADDRS_PER_FAMILY = 4
# struct dns_entry: name, expires_boottime_ns, v4_count, v6_count, v6_first, pad, v4[4][4], v6[4][16]
DNS_ENTRY = struct.Struct(f"={DNS_NAME_MAX}sQBBB5x{4 * DNS_ADDRS_PER_FAMILY}s{16 * DNS_ADDRS_PER_FAMILY}s")

# --- bpf/xdp_filter.c ------------------------------------------------------------
XDP_PROGRAM = "xdp_ip_filter"
ACCESS_ALLOW = {4: "ACCESS_ALLOW_V4", 6: "ACCESS_ALLOW_V6"}   # lpm_trie: struct lpm_v*_key -> u8
ACCESS_DENY = {4: "ACCESS_DENY_V4", 6: "ACCESS_DENY_V6"}
XDP_PORTS = "XDP_PORTS"            # hash: u16 port (host order) -> u8
XDP_CONFIG = "XDP_CONFIG"          # array[1] of struct xdp_config
XDP_STATS = "XDP_STATS"            # per-CPU array[1] of struct xdp_stats
XDP_CONFIG_LAYOUT = struct.Struct("=II")   # allow_list_active, ports_only
LPM_PREFIX = struct.Struct("=I")           # the prefix length that heads an lpm key
PORT = struct.Struct("=H")
PRESENT = b"\x01"                          # the u8 value of a rule or port entry
ARRAY_KEY_0 = struct.pack("=I", 0)

# Per-CPU counter maps: their u64 fields, in the order of the C structs.
PERCPU_COUNTERS = {
    RELAY_STATS: ("relayed_bytes", "relayed_skbs", "redirect_failures", "up_bytes", "down_bytes", "trimmed_bytes",
                  "trim_failures"),
    XDP_STATS: ("passed", "dropped_deny", "dropped_not_allowed"),
}

# --- bpf/steer.c -------------------------------------------------------------------
STEER_PROGRAM = "steer_connection"
STEER_SLOTS = "STEER_SLOTS"          # mmapable array: worker slot -> struct steer_slot
STEER_CONFIG = "STEER_CONFIG"        # array[1] of struct steer_config
STEER_LISTENERS = "STEER_LISTENERS"  # hash: struct steer_address -> u32 listener index
STEER_SOCKETS = "STEER_SOCKETS"      # sockmap: listener index * STEER_WORKERS_MAX + slot -> socket
STEER_LISTENERS_MAX, STEER_WORKERS_MAX = 16, 64
# struct steer_slot: live, steered[STEER_LISTENERS_MAX], accepted[STEER_LISTENERS_MAX] (u64 each):
# the cells' offsets, and their count
STEER_LIVE, STEER_STEERED, STEER_ACCEPTED = 0, 1, 1 + STEER_LISTENERS_MAX
STEER_SLOT_CELLS = 1 + 2 * STEER_LISTENERS_MAX
STEER_KEY = struct.Struct("=I")                 # STEER_SLOTS and STEER_SOCKETS keys, STEER_LISTENERS values
STEER_CONFIG_LAYOUT = struct.Struct("=IIII")    # workers, backlog, margin, pad
STEER_ADDRESS = struct.Struct("=II16s")         # family, port (host order), address (network order)
SOCKET_FD = struct.Struct("=I")                 # a sockmap value on update: the socket's descriptor

# --- the loader's own map --------------------------------------------------------
LAYOUT = "LAYOUT"                  # array[1] of struct layout; pinned last: "the pins are complete"
LAYOUT_VALUE = struct.Struct("<II")   # version, owner_pid

# Every map's value size, as bpf/*.c declares it.
VALUE_SIZES = {
    SOCK_MAP: COOKIE.size, SOCK_TARGETS: COOKIE.size,
    CONNECTION_MAP: Connection.LAYOUT.size, RELAY_CONTROL: RelayControl.LAYOUT.size,
    RELAY_STATS: 8 * len(PERCPU_COUNTERS[RELAY_STATS]),
    DNS_CACHE: DNS_ENTRY.size,
    **{name: len(PRESENT) for name in (*ACCESS_ALLOW.values(), *ACCESS_DENY.values(), XDP_PORTS)},
    XDP_CONFIG: XDP_CONFIG_LAYOUT.size,
    XDP_STATS: 8 * len(PERCPU_COUNTERS[XDP_STATS]),
    STEER_SLOTS: 8 * STEER_SLOT_CELLS, STEER_CONFIG: STEER_CONFIG_LAYOUT.size, STEER_LISTENERS: 4,
    STEER_SOCKETS: SOCKET_FD.size,
    LAYOUT: LAYOUT_VALUE.size,
}

# --- programs ----------------------------------------------------------------------
PROG_XDP, PROG_SK_SKB, PROG_SK_REUSEPORT = 6, 14, 21
ATTACH_SK_SKB_STREAM_PARSER, ATTACH_SK_SKB_STREAM_VERDICT = 4, 5
PROG_TYPE_NAMES = {PROG_XDP: "xdp", PROG_SK_SKB: "sk_skb", PROG_SK_REUSEPORT: "sk_reuseport"}
SOCKMAP_ATTACH_NAMES = {ATTACH_SK_SKB_STREAM_PARSER: "stream parser", ATTACH_SK_SKB_STREAM_VERDICT: "stream verdict"}


@dataclass(frozen=True)
class ProgramSpec:
    prog_type: int
    attach_map: str | None = None  # map the program is attached to, if any
    attach_type: int | None = None


# Every function a bpf/*.c file exports, with its type. XDP programs are
# attached to interfaces by their owner, from the pinned program; the steering
# program to listening sockets by the master (steering.py).
PROGRAMS = {
    RELAY_PROGRAM: ProgramSpec(PROG_SK_SKB, SOCK_MAP, ATTACH_SK_SKB_STREAM_VERDICT),
    XDP_PROGRAM: ProgramSpec(PROG_XDP),
    STEER_PROGRAM: ProgramSpec(PROG_SK_REUSEPORT),
}


def map_sizes(max_pairs: int, dns_cache_size: int) -> dict[str, int]:
    """The -D knobs that size the maps: a pair is two sockets, each with its own
    SOCK_MAP, SOCK_TARGETS, CONNECTION_MAP (and RELAY_CONTROL) entry."""
    return {"SOCK_MAP_MAX": 2 * max_pairs, "CONNECTION_MAP_MAX": 2 * max_pairs, "DNS_CACHE_SIZE": dns_cache_size,
            "STEER_LISTENERS_MAX": STEER_LISTENERS_MAX, "STEER_WORKERS_MAX": STEER_WORKERS_MAX}
