"""Which worker takes a new connection: bpf/steer.c, and its two writers.

The master puts each slot's listening socket in STEER_SOCKETS, names each
listener's address in STEER_LISTENERS, and attaches the program to every
listener's SO_REUSEPORT group (`place`). Each worker writes its own slot of
STEER_SLOTS through an mmap (`SlotCells`): one more accepted, how many it holds.
bpf.steering = "hash" detaches the program, and the kernel's hash spreads
connections as it did before.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import struct

from . import bpfsys
from .kernel_abi import (ARRAY_KEY_0, SOCKET_FD, STEER_ACCEPTED, STEER_ADDRESS, STEER_CONFIG, STEER_CONFIG_LAYOUT,
                         STEER_KEY, STEER_LISTENERS, STEER_LISTENERS_MAX, STEER_LIVE, STEER_PROGRAM, STEER_SLOT_CELLS,
                         STEER_SLOTS, STEER_SOCKETS, STEER_STEERED, STEER_WORKERS_MAX)

log = logging.getLogger("sniproxy.bpf")

SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF = 52, 68
_TCPI_UNACKED = struct.Struct("=24xI")             # tcp_info of a listener: its accept queue's length


def address_key(sock: socket.socket) -> bytes:
    """A listening socket's address as the program reads it from struct bpf_sock."""
    host, port = sock.getsockname()[:2]
    host = host.split("%")[0]   # a link-local address's scope
    return STEER_ADDRESS.pack(sock.family, port, socket.inet_pton(sock.family, host).ljust(16, b"\0"))


def place(pin_path: str, cfg, sockets: dict[tuple[int, str], socket.socket]) -> bool:
    """Steer the listeners of cfg over the slots' sockets (slot, address) -> socket, or
    hand them back to the kernel's hash; at start and at each reload, after binding.
    True when the program steers."""
    listeners = {lc.address: i for i, lc in enumerate(cfg.listener[:STEER_LISTENERS_MAX])}
    workers = 1 + max(slot for slot, _ in sockets)
    steer = cfg.bpf.steering == "fill"
    if steer and workers > STEER_WORKERS_MAX:
        log.warning("bpf.steering = fill steers at most %d workers: with %d, the kernel's hash spreads "
                    "connections", STEER_WORKERS_MAX, workers)
        steer = False
    path = lambda name: os.path.join(pin_path, name)  # noqa: E731
    with bpfsys.PinnedMap.open(path(STEER_CONFIG)) as config, \
            bpfsys.PinnedMap.open(path(STEER_LISTENERS)) as addresses, \
            bpfsys.PinnedMap.open(path(STEER_SOCKETS)) as members:
        config.update(ARRAY_KEY_0, STEER_CONFIG_LAYOUT.pack(
            workers if steer else 0, cfg.bpf.steering_backlog, cfg.bpf.steering_margin, 0))
        wanted = {address_key(sock): listeners[address] for (_, address), sock in sockets.items()
                  if address in listeners}
        wanted_members = {listeners[address] * STEER_WORKERS_MAX + slot: sock
                          for (slot, address), sock in sockets.items() if address in listeners}
        for key in set(addresses.keys()) - wanted.keys():
            addresses.delete(key)
        for key in set(range(STEER_LISTENERS_MAX * STEER_WORKERS_MAX)) - wanted_members.keys():
            try:   # a sockmap lists every index as a key; an empty one answers EINVAL
                members.delete(STEER_KEY.pack(key))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        for key, index in wanted.items():
            addresses.update(key, STEER_KEY.pack(index))
        for key, sock in wanted_members.items():
            members.update(STEER_KEY.pack(key), SOCKET_FD.pack(sock.fileno()))
    program = bpfsys.obj_get(path(STEER_PROGRAM))
    try:
        for address in {address for _, address in sockets}:   # the program belongs to the group
            sock = sockets[(0, address)]
            if steer:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, program)
            else:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
                except OSError as e:
                    if e.errno != errno.ENOENT:   # none was attached
                        raise
    finally:
        os.close(program)
    return steer


class SlotCells:
    """A worker's slot of STEER_SLOTS, written as plain memory: the program reads it
    for every new connection, and a system call per accept would cost more than
    steering saves. The slot's worker writes it; one that leaves stops, though for the
    moment between a reload's fork and its signal, both may (correct() mends that)."""

    def __init__(self, pin_path: str, slot: int):
        fd = bpfsys.obj_get(os.path.join(pin_path, STEER_SLOTS))
        try:
            size = -(-STEER_WORKERS_MAX * STEER_SLOT_CELLS * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        base = slot * STEER_SLOT_CELLS
        self._cells = memoryview(self._map).cast("Q")[base:base + STEER_SLOT_CELLS]

    def accepted(self, listener: int) -> None:
        """One more accepted; not past what the program steered here (the kernel's hash
        places some, while the program is being attached or a reload re-places sockets)."""
        if self._cells[STEER_ACCEPTED + listener] < self._cells[STEER_STEERED + listener]:
            self._cells[STEER_ACCEPTED + listener] += 1

    def holding(self, live: int) -> None:
        self._cells[STEER_LIVE] = live

    def correct(self, listener: int, listening: socket.socket) -> None:
        """Accepted, from what the program steered and what waits in the accept queue:
        a worker that drained on reload accepted from the same socket, and a slot's
        previous worker may have died with connections in its queue."""
        steered = self._cells[STEER_STEERED + listener]   # first: what it counts next may not be queued yet
        queued = _TCPI_UNACKED.unpack(listening.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO,
                                                           _TCPI_UNACKED.size))[0]
        self._cells[STEER_ACCEPTED + listener] = max(steered - queued, 0)
