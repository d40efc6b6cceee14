"""sd_notify: tell systemd (Type=notify) when the proxy is ready, reloading or
stopping, over the datagram socket it names in NOTIFY_SOCKET. Without systemd,
nothing is sent."""
from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> None:
    """Send "KEY=value" lines, e.g. notify("READY=1", "STATUS=serving")."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):          # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(fields).encode(), address)
        except OSError:
            pass                          # systemd went away: nothing to tell


def monotonic_usec() -> str:
    """The MONOTONIC_USEC= field that goes with RELOADING=1."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
