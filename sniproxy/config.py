"""The configuration: one declaration of every setting, decoded and checked once.

TOML is parsed with tomllib, converted into frozen msgspec Structs (unknown
keys are errors), then checked semantically. Every problem is reported as one
line that names the key path and the bad value.
"""
from __future__ import annotations

import functools
import grp
import ipaddress
import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from .firstflight import normalize_name


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class MasterConfig(_Section):
    workers: int = 0                 # 0 = one per CPU
    pidfile: str = ""                # "" = derived from the config path
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0     # a worker whose heartbeat is older is aborted
    max_connections: int = 0         # per worker; 0 = no limit but the fd limit
    user: str = ""                   # workers run as this user after setup; "" = stay
    group: str = ""                  # ... and group; "" = the user's own


class BpfConfig(_Section):
    mode: Literal["auto", "require", "off"] = "auto"
    pin_path: str = "/sys/fs/bpf/sniproxy"
    xdp_interfaces: tuple[str, ...] = ()
    xdp_mode: Literal["auto", "native", "generic"] = "auto"
    xdp_ports_only: bool = True      # filter only TCP to the listeners' ports; pass other traffic
    sndbuf: int = 32 << 20           # send/receive buffers of kernel-relayed sockets
    max_queued: int = 64 << 20       # bytes the kernel may queue toward a slow reader
    max_pairs: int = 32768           # pairs the kernel relay holds at once; more stay in userspace
    # A kernel-relayed pair moving relay.splice_rate or more in small skbs (under 32 KiB on
    # average) runs its verdict once this many bytes wait on a socket (SO_RCVLOWAT), and every
    # 2 ms over whatever waits, rather than for each skb: each redirect wakes a kworker. A TLS
    # download from a local origin (16 KiB records, an skb each) made 707 MB/s at 80,950
    # context switches a GB; batched at 256 KiB, 917 at 16,900 (bench/results/2026-11-28-batching),
    # and at 1 MiB 4% faster again than at 256 KiB, at 7,200 (mark_ab.py there, 21 rounds).
    # 0: a verdict for each skb.
    batch_bytes: int = 1 << 20
    # relay.policy kernel or splice: a pair starts in the copy relay and moves on once this
    # many bytes moved or it lived this long: registering costs more than relaying a short exchange.
    handoff_bytes: int = 64 << 10
    handoff_after: float = 0.1
    # Which worker takes a new connection (bpf/steer.c). fill: the lowest worker slot with
    # at most steering_backlog connections sent to it and not yet accepted, and at most
    # steering_margin connections more than the least loaded worker holds; hash: the
    # kernel's SO_REUSEPORT hash, even whatever the load. A Python worker pays for each
    # wakeup, so one busy worker serves a connection for less than two half-busy ones.
    # Measured with 2 workers (bench/results/2026-11-29-steering): 1.06x the hash's connection
    # rate (median of five runs) at 0.94x its CPU per connection; the mixed load's requests
    # spread 0.79-1.11x, and a margin of 8 spreads long-lived connections evenly. A backlog of
    # 64, not 4 (bench/results/2026-11-29-setup-floor, two runs): 1.07x and 1.13x the connection
    # rate, at the user time a connection of one worker alone; the active and mixed loads level.
    steering: Literal["fill", "hash"] = "fill"
    steering_backlog: int = 64
    steering_margin: int = 64


class RelayConfig(_Section):
    # Which relay carries a connection. Every one starts in copy (recv/send). kernel (the
    # SK_SKB verdict) or splice (zero-copy through pipes): it moves there once it outgrows
    # the first exchanges (bpf.handoff_*). copy: it stays. auto: it moves by its rate over
    # each window: at splice_rate or more (over the window so far, one second of it at
    # least) it is fast, and goes to fast_relay: the kernel where BPF is available, for good,
    # or splice, and back once it falls below half of it; at kernel_rate or less (quiet,
    # idle) to the kernel where BPF is available.
    # Between the two, request/response traffic, it stays in copy, unless it is chatty:
    # kernel_messages reads within a window, of 1 KiB or less on average (ping-pong), go to
    # the kernel, which added the least latency on the bench machine (64-byte ping-pong:
    # p50 34.6 us against copy's 47.7, nginx 42.8; bench/results/2026-11-28-latency).
    # The defaults come from bench/results/2026-11-27-active and -bulk: copy led the 1,000
    # keep-alive connections (16 KiB: the kernel relay 0.88x copy, splice 0.95x); splice and
    # the kernel led one bulk stream (1.21x and 1.14x copy), and no keep-alive connection of
    # that run (8.7 requests/s each, 0.14-2.2 MB/s) came near 64 MiB/s. Idle pairs go to the
    # kernel, where they cost no wakeup and outlive their worker (keeper.py). A window of 1 s
    # sent 245 of those 1,000 connections to the kernel (a second without a request, waiting
    # their turn); one of 5 s sent none (bench/results/2026-11-27/ANALYSIS.md).
    policy: Literal["auto", "kernel", "splice", "copy"] = "auto"
    # Where auto sends a fast pair: the kernel, from the day's five runs that measured both
    # (bench/results/2026-11-28-fast-kernel/NOTES.md): it led splice on one bulk stream
    # (1.01-1.42x), was level to 10% behind on four (0.88-1.05x), level on the TLS download
    # (ahead in 3 of 6), and cheaper in every run (system-wide CPU per GB; the proxy's own a
    # quarter or less). Another kernel build found splice ahead: bench/run --only bulk tells.
    fast_relay: Literal["kernel", "splice"] = "kernel"
    # Where auto sends a fast pair that speaks TLS (its first flight a ClientHello). A TLS
    # server writes records of 16 KiB at most, which on a local path reach the verdict as an
    # skb each. On the bench's TLS download splice led the kernel relay by 2-9% at 6% less
    # system-wide CPU (bench/results/2026-11-29-tls-splice, -tls-ceiling, -tls-veth). A
    # worker that a reload or an upgrade replaces moves its splice pairs to the kernel relay,
    # where that is in use, and they outlive it (relay.LEAVING, keeper.py); on a stop they get
    # master.graceful_timeout, and a worker that crashes takes them with it, where
    # kernel-relayed ones would live on.
    tls_fast_relay: Literal["kernel", "splice"] = "splice"
    window: float = 5.0               # seconds
    splice_rate: int = 64 << 20       # bytes/s, both directions together
    kernel_rate: int = 0              # bytes/s; -1: never to the kernel
    kernel_messages: int = 1000       # reads within a window; 0: never for that


class AccessConfig(_Section):
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()


class ResolverConfig(_Section):
    nameservers: tuple[str, ...] = ()
    mode: Literal["ipv4_only", "ipv6_only", "ipv4_first", "ipv6_first"] = "ipv4_first"
    cache_size: int = 65536
    allow_private: bool = False


class TimeoutsConfig(_Section):
    # From the accept; listeners defer accept until the first bytes (master.py), so a client
    # that sends nothing at all is accepted, and timed, about a second after it connected.
    client_hello: float = 5.0
    connect: float = 5.0
    idle: float = 600.0
    # Once one direction has finished, the other may idle this long; absent: `idle`.
    half_closed: float | None = None


class LogConfig(_Section):
    access: str = "-"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ListenerConfig(_Section):
    address: str = "127.0.0.1:8443"
    protocol: Literal["tls", "http"] = "tls"
    table: str = "default"
    fallback: str = ""
    accept_proxy: bool = False                # a PROXY header (v1 or v2) comes first, from an L4 balancer
    trusted_sources: tuple[str, ...] = ()     # CIDRs that may send one; needed with accept_proxy


class MetricsConfig(_Section):
    address: str = "127.0.0.1:9464"   # Prometheus exposition, served by the master; "" = off


class RouteConfig(_Section):
    match: str
    backend: str
    # Only for a ClientHello that offers one of these ALPN protocols; () = any first flight.
    alpn: tuple[str, ...] = ()
    proxy_protocol: Literal["", "v1", "v2"] = ""   # a PROXY header to the backend before the first flight
    # TCP Fast Open to the backend: the first flight rides the SYN, a round trip less per connection
    # (with a backend that enabled it; others answer as to any SYN).
    fastopen: bool = False


DEFAULT_ROUTES = {"default": (RouteConfig(match="example.com", backend="127.0.0.1:9443"),)}


class Config(_Section):
    master: MasterConfig = MasterConfig()
    bpf: BpfConfig = BpfConfig()
    relay: RelayConfig = RelayConfig()
    access: AccessConfig = AccessConfig()
    resolver: ResolverConfig = ResolverConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    listener: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    table: dict[str, tuple[RouteConfig, ...]] = msgspec.field(default_factory=lambda: dict(DEFAULT_ROUTES))


class ConfigError(Exception):
    """Every problem found in one config, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


# --- addresses ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class HostPort:
    host: str   # IP literal or name, without brackets; "*" for "resolve the requested name"
    port: int

    @property
    def is_ip(self) -> bool:
        return _is_ip_literal(self.host)

    def __str__(self) -> str:
        return hostport_text(self.host, self.port)


def hostport_text(host: str, port: int) -> str:
    """host:port as configs and logs write it ([v6]:port); what str(HostPort) gives, without
    making one (the access-log record of every connection has two)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=1024)   # asked for every connection, of a few configured hosts
def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_hostport(text: str, default_port: int | None = None) -> HostPort:
    """"ip:port", "[v6]:port", "name:port" (or just the host if default_port is given)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?|([0-9A-Fa-f:.]+)", text)
    if not m:
        raise ValueError("not host:port")
    host = m.group(1) or m.group(3) or m.group(5)
    port_text = m.group(2) or m.group(4)
    if m.group(5):   # a bare IPv6 literal only makes sense without a port
        port_text = None
    if m.group(1) or m.group(5):
        ipaddress.IPv6Address(host)
    if port_text is None:
        if default_port is None:
            raise ValueError("missing port")
        port = default_port
    else:
        port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port out of range")
    return HostPort(host, port)


def parse_listen_address(text: str) -> HostPort:
    hp = parse_hostport(text)
    ipaddress.ip_address(hp.host)   # listeners bind IP literals only
    return hp


# --- loading -----------------------------------------------------------------

def load(path: str | Path | None = None, text: str | None = None) -> Config:
    """Decode and check a config; raise ConfigError naming every problem."""
    if text is None:
        text = Path(path).read_text() if path else ""
    source = str(path) if path else "<default>"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"TOML syntax: {e}"]) from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(source, [_describe_validation_error(str(e), raw)]) from None
    problems = list(check(cfg))
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _describe_validation_error(message: str, raw: dict) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.master.workers`"; name the key and value."""
    what, _, where = message.partition(" - at `")
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    unknown = re.search(r"unknown field `([^`]*)`", what)
    if unknown:
        path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        what = "unknown key"
    if "[...]" in path:   # msgspec names no key of a dict (the tables): find the one that fails
        field, _, rest = path.partition("[...]")
        for key, entries in (raw.get(field) or {}).items():
            try:
                msgspec.convert({**raw, field: {key: entries}}, Config)
            except msgspec.ValidationError:
                path = f"{field}.{key}{rest}"
                break
    value = _lookup(raw, path)
    shown = f" = {value!r}" if value is not _MISSING else ""
    return f"{path or '<top>'}{shown}: {what.replace('`', '')}"


_MISSING = object()


def _lookup(raw: Any, path: str) -> Any:
    node = raw
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            node = node[int(part[1:-1])] if part.startswith("[") else node[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return _MISSING
    return node


def check(cfg: Config):
    """Yield one line per semantic problem."""
    def bad(key: str, value: Any, why: str) -> str:
        return f"{key} = {value!r}: {why}"

    m = cfg.master
    for key in ("workers", "max_connections"):
        if getattr(m, key) < 0:
            yield bad(f"master.{key}", getattr(m, key), "must be 0 (see etc/sniproxy.toml) or more")
    for key in ("user", "group"):
        try:
            if getattr(m, key):
                (pwd.getpwnam if key == "user" else grp.getgrnam)(getattr(m, key))
        except KeyError:
            yield bad(f"master.{key}", getattr(m, key), f"no such {key}")
    for key in ("graceful_timeout", "worker_timeout"):
        if getattr(m, key) <= 0:
            yield bad(f"master.{key}", getattr(m, key), "must be positive")
    for key in ("client_hello", "connect", "idle", "half_closed"):
        if getattr(cfg.timeouts, key) is not None and getattr(cfg.timeouts, key) <= 0:
            yield bad(f"timeouts.{key}", getattr(cfg.timeouts, key), "must be positive")
    if not cfg.bpf.pin_path.startswith("/"):
        yield bad("bpf.pin_path", cfg.bpf.pin_path, "must be an absolute path")
    if cfg.bpf.batch_bytes < 0:
        yield bad("bpf.batch_bytes", cfg.bpf.batch_bytes, "must be 0 (off) or more")
    for key in ("sndbuf", "max_queued", "max_pairs"):
        if getattr(cfg.bpf, key) <= 0:
            yield bad(f"bpf.{key}", getattr(cfg.bpf, key), "must be positive")
    for key in ("steering_backlog", "steering_margin"):
        if not 0 <= getattr(cfg.bpf, key) < 1 << 32:
            yield bad(f"bpf.{key}", getattr(cfg.bpf, key), "must be 0 to 4294967295")
    for key in ("handoff_bytes", "handoff_after"):
        if getattr(cfg.bpf, key) < 0:
            yield bad(f"bpf.{key}", getattr(cfg.bpf, key), "must be 0 (at once) or more")
    if cfg.relay.window <= 0:
        yield bad("relay.window", cfg.relay.window, "must be positive")
    if cfg.relay.splice_rate <= 0:
        yield bad("relay.splice_rate", cfg.relay.splice_rate, "must be positive")
    if not -1 <= cfg.relay.kernel_rate < max(cfg.relay.splice_rate // 2, 1):
        yield bad("relay.kernel_rate", cfg.relay.kernel_rate, "must be -1 (never) or more, below splice_rate / 2")
    if cfg.relay.kernel_messages < 0:
        yield bad("relay.kernel_messages", cfg.relay.kernel_messages, "must be 0 (never) or more")
    if cfg.resolver.cache_size <= 0:
        yield bad("resolver.cache_size", cfg.resolver.cache_size, "must be positive")
    for kind in ("allow", "deny"):
        for i, cidr in enumerate(getattr(cfg.access, kind)):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                yield bad(f"access.{kind}[{i}]", cidr, "not a CIDR")
    for i, ns in enumerate(cfg.resolver.nameservers):
        try:
            ipaddress.ip_address(parse_hostport(ns, default_port=53).host)
        except ValueError:
            yield bad(f"resolver.nameservers[{i}]", ns, 'expected "ip" or "ip:port"')

    seen: set[tuple[str, int]] = set()
    for i, lst in enumerate(cfg.listener):
        key = f"listener[{i}]"
        try:
            hp = parse_listen_address(lst.address)
            if (hp.host, hp.port) in seen:
                yield bad(f"{key}.address", lst.address, "listed twice")
            seen.add((hp.host, hp.port))
        except ValueError as e:
            yield bad(f"{key}.address", lst.address, f"expected ip:port or [ipv6]:port ({e})")
        if lst.table not in cfg.table:
            yield bad(f"{key}.table", lst.table, f"no such table (have: {', '.join(sorted(cfg.table)) or 'none'})")
        if lst.fallback:
            try:
                parse_hostport(lst.fallback)
            except ValueError as e:
                yield bad(f"{key}.fallback", lst.fallback, f"expected host:port ({e})")
        for j, cidr in enumerate(lst.trusted_sources):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                yield bad(f"{key}.trusted_sources[{j}]", cidr, "not a CIDR")
        if lst.accept_proxy and not lst.trusted_sources:
            yield bad(f"{key}.accept_proxy", True, "needs trusted_sources: who may say where clients come from")
    if cfg.metrics.address:
        try:
            parse_listen_address(cfg.metrics.address)
        except ValueError as e:
            yield bad("metrics.address", cfg.metrics.address, f'expected ip:port or "" ({e})')

    for i, lst in enumerate(cfg.listener):
        if lst.fallback and _is_own_listener(lst.fallback, seen):
            yield bad(f"listener[{i}].fallback", lst.fallback, "is one of this proxy's own listeners (a loop)")
    for name, routes in cfg.table.items():
        for i, route in enumerate(routes):
            key = f"table.{name}[{i}]"
            if _is_own_listener(route.backend, seen):
                yield bad(f"{key}.backend", route.backend, "is one of this proxy's own listeners (a loop)")
            problem = match_problem(route.match)
            if problem:
                yield bad(f"{key}.match", route.match, problem)
            for j, protocol in enumerate(route.alpn):
                if not 0 < len(protocol.encode()) < 256:
                    yield bad(f"{key}.alpn[{j}]", protocol, "an ALPN protocol name is 1 to 255 bytes")
            try:
                hp = parse_hostport(route.backend)
                if hp.host != "*" and not hp.is_ip and normalize_name(hp.host)[0] is None:
                    raise ValueError("bad host name")
            except ValueError as e:
                yield bad(f"{key}.backend", route.backend, f'expected host:port or "*:PORT" ({e})')


def _is_own_listener(backend: str, listening: set[tuple[str, int]]) -> bool:
    """An IP backend on a listener's address, or on its port where it listens on every address."""
    try:
        hp = parse_hostport(backend)
        ip = ipaddress.ip_address(hp.host)
    except ValueError:
        return False       # a name (or "*"): checked where it resolves (routing.Router.loops_back)
    listening = {(ipaddress.ip_address(host), port) for host, port in listening}
    any_address = ipaddress.ip_address("::" if ip.version == 6 else "0.0.0.0")
    return (ip, hp.port) in listening or \
        ((any_address, hp.port) in listening and (ip.is_loopback or ip.is_unspecified))


def match_problem(pattern: str) -> str:
    """"" if the route pattern is usable, else why not."""
    if pattern.startswith("~"):
        try:
            re.compile(pattern[1:])
        except re.error as e:
            return f"bad regex: {e}"
        return ""
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if normalize_name(name)[0] is None:
        return 'expected a DNS name, "*.suffix" or "~regex"'
    return ""

