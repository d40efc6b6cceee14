"""The master's side of BPF: decide what the kernel may do, load, pin, attach, undo.

bpf.mode: "off" relays in userspace; "require" refuses to start without the
kernel relay; "auto" uses each piece the kernel and privileges allow and says
once, clearly, what it skipped and why. One missing piece does not disable the
others: XDP failing on an interface leaves the relay on.
"""
from __future__ import annotations

import logging
import os

from .config import Config, parse_listen_address
from .kernel_abi import CONNECTION_MAP, RELAY_CONTROL, SOCK_TARGETS, map_sizes

log = logging.getLogger("sniproxy.bpf")
PROGRAMS = ("relay", "dns_cache", "xdp_filter", "steer")


class BpfSetupError(Exception):
    pass


class BpfSetup:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.relay_kind = "userspace"
        self.pins_for_workers: str | None = None   # set when workers have pinned maps to open
        self.loaded = None
        self.xdp_attached: dict[str, int] = {}     # interface -> XDP flags used
        self.steering = False                      # bpf/steer.c chooses the worker of a new connection
        self.skipped: list[str] = []
        self._suspects: set[bytes] = set()         # relay entries with no socket at the last sweep

    def start(self, reuse_pins: dict[str, int] | None = None) -> None:
        """reuse_pins, after an upgrade: the pins are live (pairs relay through them), so
        take them as they are; it maps the interfaces XDP is attached to to their flags."""
        bpf = self.cfg.bpf
        if bpf.mode == "off":
            log.info("bpf.mode = off: relaying in userspace")
            return
        from . import bpfload
        try:
            problems = bpfload.probe(bpf.pin_path).problems()
            if problems:
                raise bpfload.BpfLoadError("; ".join(problems))
            self.loaded = bpfload.reuse(bpf.pin_path) if reuse_pins is not None else self._load(bpfload)
        except bpfload.BpfLoadError as e:
            if bpf.mode == "require":
                raise BpfSetupError(f"bpf.mode = require, but the kernel relay is unavailable: {e}") from None
            log.warning("kernel relay unavailable, relaying in userspace instead: %s", e)
            self.skipped.append(f"kernel relay: {e}")
            return
        self.relay_kind = "kernel"
        self.pins_for_workers = bpf.pin_path
        self._load_access_rules(self.cfg)
        for ifname in bpf.xdp_interfaces:
            if ifname in (reuse_pins or {}):
                self.xdp_attached[ifname] = reuse_pins[ifname]
            else:
                self._attach_xdp(ifname)

    def _load(self, bpfload):
        """Every program; steering is the one the relay does without (it needs 5.14's
        sk_reuseport_md.sk): where it fails, the kernel's hash spreads connections."""
        try:
            return bpfload.load(self.cfg.bpf.pin_path, PROGRAMS, cflags=self._cflags())
        except bpfload.BpfLoadError as e:
            if not str(e).startswith("bpf/steer.c"):
                raise
            log.warning("bpf.steering unavailable, new connections are hashed over the workers: %s", e)
            self.skipped.append(f"steering: {e}")
            return bpfload.load(self.cfg.bpf.pin_path, tuple(p for p in PROGRAMS if p != "steer"),
                                cflags=self._cflags())

    def layout_version(self) -> int | None:
        """The layout of the maps pinned now (None: nothing pinned)."""
        from . import bpfload
        return bpfload.read_layout(self.cfg.bpf.pin_path) if self.loaded is not None else None

    def _cflags(self) -> dict[str, int]:
        return map_sizes(self.cfg.bpf.max_pairs, self.cfg.resolver.cache_size)

    def _load_access_rules(self, cfg: Config) -> None:
        from . import xdp
        ports = sorted({parse_listen_address(lc.address).port for lc in cfg.listener}) \
            if cfg.bpf.xdp_ports_only else []
        xdp.load_access_rules(cfg.bpf.pin_path, list(cfg.access.allow), list(cfg.access.deny), ports)

    def _attach_xdp(self, ifname: str) -> None:
        from . import xdp
        try:
            self.xdp_attached[ifname] = xdp.attach(self.cfg.bpf.pin_path, ifname, self.cfg.bpf.xdp_mode)
            log.info("xdp_ip_filter attached to %s", ifname)
        except Exception as e:  # noqa: BLE001 - pyroute2 raises several kinds; each only skips XDP here
            log.warning("XDP source filter not attached to %s (the accept-time filter still applies): %s",
                        ifname, e)
            self.skipped.append(f"xdp on {ifname}: {e}")

    def sweep_stale_pairs(self) -> int:
        """Remove the CONNECTION_MAP and RELAY_CONTROL entries whose socket is in no
        sockmap at two sweeps in a row; return how many went. A worker that ended
        with kernel pairs (graceful timeout, QUIT, a crash, SIGKILL) leaves them
        behind: closing its sockets took them out of SOCK_TARGETS, where every
        registered socket sits, but nothing else. Two sweeps, because a registration
        writes CONNECTION_MAP just before SOCK_TARGETS."""
        if self.loaded is None:
            return 0
        with self.loaded.open_map(SOCK_TARGETS) as targets, self.loaded.open_map(CONNECTION_MAP) as connections, \
                self.loaded.open_map(RELAY_CONTROL) as control:
            live = set(targets.keys())
            suspects = (set(connections.keys()) | set(control.keys())) - live
            stale = suspects & self._suspects
            for key in stale:
                connections.delete(key)
                control.delete(key)
        self._suspects = suspects - stale
        if stale:
            log.info("removed the relay entries of %d sockets that no longer exist", len(stale))
        return len(stale)

    def steer(self, sockets: dict) -> None:
        """bpf.steering over the listening sockets the master holds now: (slot, address) -> socket."""
        from .kernel_abi import STEER_PROGRAM
        if self.loaded is None or not os.path.exists(self.loaded.map_path(STEER_PROGRAM)):
            return
        from . import steering
        try:
            self.steering = steering.place(self.cfg.bpf.pin_path, self.cfg, sockets)
        except OSError as e:   # the hash still spreads connections: worth a warning, not a stop
            log.warning("bpf.steering: new connections are hashed over the workers instead: %s", e)
            self.steering = False

    def reload(self, cfg: Config) -> None:
        self.cfg = cfg
        if self.loaded is not None:
            self._load_access_rules(cfg)

    def stop(self) -> None:
        if self.xdp_attached:
            from . import xdp
        for ifname, flags in self.xdp_attached.items():
            try:
                xdp.detach(ifname, flags)
            except Exception as e:  # noqa: BLE001
                log.warning("detaching XDP from %s: %s", ifname, e)
        self.xdp_attached.clear()
        if self.loaded is not None:
            self.loaded.unpin()
            self.loaded = None

    def describe(self) -> list[str]:
        lines = [f"relay: {self.relay_kind}"]
        if self.loaded is not None:
            lines.append(f"pins: {self.cfg.bpf.pin_path}")
        lines += [f"xdp: {name}" for name in self.xdp_attached]
        if self.loaded is not None:
            lines.append(f"steering: {'fill' if self.steering else 'hash'}")
        lines += [f"skipped {s}" for s in self.skipped]
        return lines
