"""What `sniproxy-master stats` and `maps` print: BPF counters and worker counters."""
from __future__ import annotations

import os
import struct

from .config import Config
from .counters import CounterTable
from .kernel_abi import (ARRAY_KEY_0, PERCPU_COUNTERS, PROG_TYPE_NAMES, SOCKMAP_ATTACH_NAMES, STEER_ACCEPTED,
                         STEER_KEY, STEER_LIVE, STEER_SLOT_CELLS, STEER_SLOTS, STEER_STEERED, STEER_WORKERS_MAX)


def collect(cfg: Config, state: dict | None) -> dict[str, dict]:
    out: dict[str, dict] = {"master": {"running": state is not None,
                                       "relay": state["relay"] if state else "-"}}
    if state is not None:
        table = CounterTable(state["counters"])
        out["workers"] = table.totals()
        out["live"] = {str(w["pid"]): table.gauges(w["number"]) for w in state["workers"] if "number" in w}
    for name, fields in PERCPU_COUNTERS.items():
        values = percpu_totals(os.path.join(cfg.bpf.pin_path, name), fields)
        if values is not None:
            out[name.lower()] = values
    if state is not None:
        slots = steering_slots(os.path.join(cfg.bpf.pin_path, STEER_SLOTS),
                               sorted({w["index"] for w in state["workers"] if "index" in w}))
        if slots is not None:
            out["steering"] = slots
    return out


def steering_slots(path: str, slots: list[int]) -> dict[str, int] | None:
    """Per worker slot of bpf/steer.c: connections steered to it, accepted, and held now."""
    if not os.path.exists(path):
        return None
    from .bpfsys import PinnedMap
    out = {}
    with PinnedMap.open(path) as m:
        for slot in (s for s in slots if s < STEER_WORKERS_MAX):
            cells = struct.unpack(f"{STEER_SLOT_CELLS}Q", m.lookup(STEER_KEY.pack(slot)))
            out |= {f"slot{slot}_steered": sum(cells[STEER_STEERED:STEER_ACCEPTED]),
                    f"slot{slot}_accepted": sum(cells[STEER_ACCEPTED:]), f"slot{slot}_live": cells[STEER_LIVE]}
    return out


def percpu_totals(path: str, fields: tuple[str, ...]) -> dict[str, int] | None:
    """Sum a pinned single-entry per-CPU array of u64 fields over the CPUs."""
    if not os.path.exists(path):
        return None
    from .bpfsys import PinnedMap
    with PinnedMap.open(path) as m:
        cpus = m.lookup_percpu(ARRAY_KEY_0) or []
    totals = [0] * len(fields)
    for value in cpus:
        for i, v in enumerate(struct.unpack_from(f"{len(fields)}Q", value)):
            totals[i] += v
    return dict(zip(fields, totals))


def pinned_objects(pin_path: str) -> list[tuple[str, ...]]:
    """(name, type, entries, max entries or what a program is attached to) per pinned object."""
    if not os.path.isdir(pin_path):
        return []
    from .bpfsys import BpfError, PinnedMap, attached_programs, fd_info, obj_get
    rows, programs, attached = [("NAME", "TYPE", "ENTRIES", "MAX/ATTACHED")], [], {}
    for name in sorted(os.listdir(pin_path)):
        path = os.path.join(pin_path, name)
        try:
            with PinnedMap.open(path) as m:
                entries = "-" if "array" in m.type_name or "percpu" in m.type_name else str(len(m))
                rows.append((name, m.type_name, entries, str(m.max_entries)))
                if m.type_name.startswith("sock"):
                    for kind, label in SOCKMAP_ATTACH_NAMES.items():
                        for prog_id in attached_programs(m.fd, kind):
                            attached[prog_id] = f"{label} of {name}"
        except BpfError:
            fd = obj_get(path)
            try:
                info = fd_info(fd)
            finally:
                os.close(fd)
            programs.append((name, PROG_TYPE_NAMES.get(int(info.get("prog_type", 0)), "prog"), int(info.get("prog_id", 0))))
    rows += [(name, kind, "-", attached.get(prog_id, "-")) for name, kind, prog_id in programs]
    return rows
