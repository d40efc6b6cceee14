"""Who a worker runs as: master.user and master.group, with only the capabilities it needs.

The master stays root: it binds the ports, loads and pins the BPF objects, forks
workers and sweeps the maps. A worker drops to the configured user once it is set
up, before it reads a client's byte. In kernel mode it keeps CAP_NET_ADMIN, for the
relayed sockets' forced send buffers (SO_SNDBUFFORCE), and CAP_BPF only where the
kernel refuses map access by pinned path to a process without it (probed at start:
6.18 allows it with kernel.unprivileged_bpf_disabled = 2). The files a worker opens
by path (the pins, the counters, the access log) are given to its user by the master.
"""
from __future__ import annotations

import ctypes as ct
import grp
import os
import pwd
from pathlib import Path

CAP_NET_ADMIN, CAP_BPF = 12, 39
_PR_SET_KEEPCAPS, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 8, 24, 38
_CAPABILITY_VERSION_3 = 0x20080522


class _Header(ct.Structure):
    _fields_ = [("version", ct.c_uint32), ("pid", ct.c_int)]


class _Data(ct.Structure):
    _fields_ = [("effective", ct.c_uint32), ("permitted", ct.c_uint32), ("inheritable", ct.c_uint32)]


def ids(user: str, group: str) -> tuple[int, int] | None:
    """(uid, gid) to run workers as, or None to stay as started. KeyError names what is unknown."""
    if not user and not group:
        return None
    entry = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    return entry.pw_uid, gid


def give(paths, owner: tuple[int, int]) -> None:
    """Hand files the workers open by path to their user."""
    for path in paths:
        os.chown(path, *owner)


def drop(owner: tuple[int, int], keep: set[int]) -> None:
    """Become owner's uid and gid, keeping only the capabilities in keep (and no way
    to gain others: bounding set and no_new_privs)."""
    libc = ct.CDLL(None, use_errno=True)

    def call(name: str, *args) -> None:
        if getattr(libc, name)(*args) != 0:
            raise OSError(ct.get_errno(), f"{name}{args}: {os.strerror(ct.get_errno())}")

    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        if cap not in keep:
            call("prctl", _PR_CAPBSET_DROP, cap, 0, 0, 0)
    call("prctl", _PR_SET_KEEPCAPS, 1, 0, 0, 0)   # setuid would clear the permitted set
    uid, gid = owner
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    mask = sum(1 << cap for cap in keep)
    data = (_Data * 2)((mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0), (mask >> 32, mask >> 32, 0))
    call("capset", ct.byref(_Header(_CAPABILITY_VERSION_3, 0)), data)
    call("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def kernel_relay_needs(pin_path: str, owner: tuple[int, int]) -> set[int]:
    """The capabilities a worker of owner needs for the kernel relay: a child drops
    everything but CAP_NET_ADMIN and tries to open and read a pinned map."""
    from .bpfsys import PinnedMap
    from .kernel_abi import ARRAY_KEY_0, LAYOUT
    needed = {CAP_NET_ADMIN}
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            drop(owner, needed)
            with PinnedMap.open(os.path.join(pin_path, LAYOUT)) as layout:
                layout.lookup(ARRAY_KEY_0)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return needed if os.waitstatus_to_exitcode(status) == 0 else needed | {CAP_BPF}
