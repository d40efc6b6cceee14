"""The source-address filter: rules for the pinned xdp_ip_filter maps, attach/detach, counters.

Semantics, the same in the kernel (bpf/xdp_filter.c) and in sourcefilter.SourceFilter
(the check at accept time, for interfaces without XDP): a source in `deny` is
refused; else, when `allow` is not empty, a source outside it is refused;
everyone else passes.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .sourcefilter import Network, parse_networks
from .bpfsys import PinnedMap, obj_get
from .kernel_abi import (ACCESS_ALLOW, ACCESS_DENY, ARRAY_KEY_0, LPM_PREFIX, PERCPU_COUNTERS, PORT, PRESENT,
                         XDP_CONFIG, XDP_CONFIG_LAYOUT, XDP_PORTS, XDP_PROGRAM, XDP_STATS)

XDP_FLAGS_SKB_MODE = 2   # generic: runs on the skb, works on any device
XDP_FLAGS_DRV_MODE = 4   # native: runs in the driver, needs driver support
MODE_FLAGS = {
    "native": (XDP_FLAGS_DRV_MODE,),
    "generic": (XDP_FLAGS_SKB_MODE,),
    "auto": (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE),
}


class XdpError(RuntimeError):
    pass


def lpm_key(net: Network) -> bytes:
    """struct lpm_v4_key / lpm_v6_key: u32 prefixlen (host order), address bytes."""
    return LPM_PREFIX.pack(net.prefixlen) + net.network_address.packed


def _replace_entries(m: PinnedMap, wanted: dict[bytes, bytes]) -> list[bytes]:
    """Write every wanted entry now; return the stale keys for the caller to delete later."""
    for key, value in wanted.items():
        m.update(key, value)
    return [k for k in m.keys() if k not in wanted]


def load_access_rules(pin_path: str, allow: Iterable[str], deny: Iterable[str],
                      ports: Iterable[int] = ()) -> None:
    """Make the pinned filter enforce allow/deny (and, if ports are given, only for TCP to them).

    New entries go in first, then the config flags, then stale entries go:
    during a reload the filter briefly applies the union of old and new rules,
    never an empty allow list that is flagged active.
    """
    allow_nets, deny_nets = parse_networks(allow), parse_networks(deny)
    ports = sorted(set(ports))
    with contextlib.ExitStack() as opened:
        maps = {name: opened.enter_context(PinnedMap.open(os.path.join(pin_path, name)))
                for name in (*ACCESS_ALLOW.values(), *ACCESS_DENY.values(), XDP_PORTS, XDP_CONFIG)}
        _apply_rules(maps, allow_nets, deny_nets, ports)


def _apply_rules(maps: dict[str, PinnedMap], allow_nets: list[Network], deny_nets: list[Network],
                 ports: list[int]) -> None:
    stale = []
    for nets, names in ((allow_nets, ACCESS_ALLOW), (deny_nets, ACCESS_DENY)):
        for version, name in names.items():
            wanted = {lpm_key(n): PRESENT for n in nets if n.version == version}
            stale.append((maps[name], _replace_entries(maps[name], wanted)))
    wanted_ports = {PORT.pack(p): PRESENT for p in ports}
    stale.append((maps[XDP_PORTS], _replace_entries(maps[XDP_PORTS], wanted_ports)))

    maps[XDP_CONFIG].update(ARRAY_KEY_0, XDP_CONFIG_LAYOUT.pack(bool(allow_nets), bool(ports)))

    for m, keys in stale:
        for key in keys:
            m.delete(key)


def xdp_counters(pin_path: str) -> dict[str, int]:
    """XDP_STATS summed over CPUs."""
    from .stats import percpu_totals
    path = os.path.join(pin_path, XDP_STATS)
    totals = percpu_totals(path, PERCPU_COUNTERS[XDP_STATS])
    if totals is None:
        raise FileNotFoundError(path)
    return totals


def _index(ipr: IPRoute, ifname: str) -> int:
    indexes = ipr.link_lookup(ifname=ifname)
    if not indexes:
        raise XdpError(f"xdp: no interface named {ifname!r}")
    return indexes[0]


def _set_xdp(ifname: str, fd: int, flags: int) -> None:
    with IPRoute() as ipr:
        # pyroute2's xdp_fd shortcut drops the flags, so the nested attribute is spelled out.
        ipr.link("set", index=_index(ipr, ifname),
                 xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", flags)]})


def _link_kind(ifname: str) -> str | None:
    with IPRoute() as ipr:
        info = ipr.get_links(_index(ipr, ifname))[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def mode_flags(ifname: str, mode: str) -> tuple[int, ...]:
    """The attach flags to try, in order. "auto" prefers native, except on a veth: native
    XDP on a veth takes software GSO away from its peer, which then sends MTU-sized
    packets. Measured through this proxy, a download of 16 KiB writes over a veth fell
    from 583 to 108 MB/s (kernel relay) and from 1,063 to 312 MB/s (userspace relay)
    with the filter attached native, and lost 8% and 4% with it attached generic."""
    if mode == "auto" and _link_kind(ifname) == "veth":
        return tuple(reversed(MODE_FLAGS["auto"]))
    return MODE_FLAGS[mode]


def attach(pin_path: str, ifname: str, mode: str = "auto") -> int:
    """Attach the pinned xdp_ip_filter to ifname; return the XDP flags used (needed to detach)."""
    if mode not in MODE_FLAGS:
        raise XdpError(f"xdp: mode must be one of {', '.join(MODE_FLAGS)}, not {mode!r}")
    flags_to_try = mode_flags(ifname, mode)
    fd = obj_get(os.path.join(pin_path, XDP_PROGRAM))
    try:
        errors = []
        for flags in flags_to_try:
            try:
                _set_xdp(ifname, fd, flags)
                return flags
            except NetlinkError as e:
                errors.append(f"flags {flags}: {os.strerror(e.code)}")
        raise XdpError(f"xdp: cannot attach {XDP_PROGRAM} to {ifname} ({mode}): {'; '.join(errors)}")
    finally:
        os.close(fd)


def detach(ifname: str, flags: int) -> None:
    """Remove the XDP program from ifname; flags must be those attach() returned."""
    try:
        _set_xdp(ifname, -1, flags)
    except NetlinkError as e:
        raise XdpError(f"xdp: cannot detach from {ifname}: {os.strerror(e.code)}") from None
