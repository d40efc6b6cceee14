"""Child processes of the benchmark: started in their own process group, and
all killed when the benchmark ends, however it ends."""

import ctypes
import os
import random
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_children: list[subprocess.Popen] = []


def _die_with_parent():
    # If the benchmark is SIGKILLed, no finally block runs: let the kernel kill the child.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start argv in the background with stdout and stderr in log_path."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=_die_with_parent)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL the whole process group after grace seconds."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # Workers may outlive their master: kill whatever is left in the group.
    _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        stop(proc, grace=1.0)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(argv: list[str], timeout: float, check: bool = True) -> str:
    """Run a load generator to completion; its stdout, or RuntimeError with its stderr."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True, preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{argv[0]} did not finish within {timeout:.0f} s") from exc
    if check and done.returncode != 0:
        detail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {' | '.join(detail)}")
    return done.stdout


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, from below the kernel's ephemeral range: one from that
    range may become the source port of any outgoing connection between this probe and
    the server's bind (a test holding 10,000 connections takes most of it), and the
    server then fails with EADDRINUSE."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(1000):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, random.randrange(low // 2, low) if low >= 4096 else 0))
            except OSError:   # taken: try another
                continue
            return probe.getsockname()[1]
    raise RuntimeError(f"no free port on {host} below {low}")


def _tcp_sockets():
    """(local port, state in hex) of every TCP socket, IPv4 and IPv6."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                yield int(fields[1].rsplit(":", 1)[1], 16), fields[3]


def listening_ports() -> set[int]:
    return {port for port, state in _tcp_sockets() if state == "0A"}  # TCP_LISTEN


def established_count(local_port: int) -> int:
    """Established TCP sockets whose local port is local_port (one per accepted connection)."""
    return sum(1 for port, state in _tcp_sockets() if state == "01" and port == local_port)


def wait_listening(proc: subprocess.Popen, ports: list[int], log_path: Path, timeout: float) -> None:
    """Wait until every port listens; raise with the log's tail if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}: {log_tail(log_path)}")
        if set(ports) <= listening_ports():
            return
        time.sleep(0.05)
    raise RuntimeError(f"ports {ports} not listening after {timeout:.0f} s: {log_tail(log_path)}")


def log_tail(log_path: Path, lines: int = 3) -> str:
    try:
        text = log_path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return " | ".join(text.splitlines()[-lines:]) or "(empty log)"


def raise_fd_limit() -> int:
    """The soft file limit raised to the hard one (the loads hold thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
