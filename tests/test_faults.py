"""Faults around the real master: clients that stall in their first flight, backends
that refuse, reset or never answer, and a worker killed with SIGKILL mid-transfer.

Each test proves one item of the hardening issue. Those parametrized over `mode`
run with the userspace relay ("off") and with the kernel relay ("require", pairs
in the kernel right after connect); the kernel cases are marked bpf and fail,
never skip, where BPF is unavailable.
"""
import os
import resource
import select
import signal
import socket
import struct
import threading
import time

import pytest
from harness import accept_queues, free_port, https_get, sha, wait_until
from test_kernel_proxy import AT_ONCE, HELLO, _echo, _owner, entries
from test_proxy import make_config, stats

from sniproxy.counters import CounterTable

MODES = ["off", pytest.param("require", marks=pytest.mark.bpf)]
HELLO_NAME = "curl.example.test"          # the SNI of the fixture ClientHello HELLO


def _config(port, routes, mode, pin_path, **kw):
    kernel = mode == "require"
    # Steered with no margin, held connections alternate between the workers, so that
    # both hold some (without BPF, the kernel's hash spreads them).
    return make_config(port, routes, mode=mode, pin_path=pin_path if kernel else None,
                       bpf=AT_ONCE + "steering_margin = 0\n" if kernel else "", **kw)


def _raise_nofile(needed: int):
    """Raise this process's soft RLIMIT_NOFILE (the master inherits it) to at least
    `needed`, up to the hard limit; returns the limits to restore."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY or hard < needed
                                                    else needed, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "raise the hard fd limit"
    return soft, hard


def _counters(p) -> dict[str, int]:
    """The workers' counters, read from their shared table as `stats` reads them."""
    return CounterTable(p.state()["counters"]).totals()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _access_records(path, name: str) -> list[dict]:
    """The access log's records for `name`, each as a dict of its fields."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        fields = dict(field.split("=", 1) for field in line.split()[1:])
        if fields.get("name") == name:
            records.append(fields)
    return records


def _accept_queue(port: int, pid: int) -> int:
    """Connections waiting in the accept queue of the listening socket on port that
    pid holds."""
    listeners = accept_queues(port)
    waiting = [queued for line, queued in listeners if f"pid={pid}," in line]
    assert len(waiting) == 1, listeners
    return waiting[0]


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):     # gone, or going while read
        return "gone"


# --- 1. slow clients -------------------------------------------------------------

def test_stalled_first_flights_neither_delay_a_client_nor_outlive_client_hello(proxy, backends):
    """300 clients send the first byte of a TLS record (0x16) and stall. While the
    proxy holds them, a real client is served in well under a second (the wait for a
    first flight blocks no worker); each of the 300 reads EOF at timeouts.client_hello
    after it connected, and is counted once as refused_client_hello_timeout."""
    n, limit = 300, 2.0
    limits = _raise_nofile(n + 256)
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], workers=2,
                          extra=f"[timeouts]\nclient_hello = {limit}\n"), wait_ports=(port,))
    wait_until(lambda: _counters(p)["closed_early"] >= 1, what="the harness's probe to end")
    probes = _counters(p)["accepted"]
    stalled, connected = [], []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            connected.append(time.monotonic())
            s.sendall(b"\x16")
            stalled.append(s)
        # Held by the workers, not waiting in their accept queues. (The counter table
        # itself: `stats` starts a process, slow on a loaded machine.)
        wait_until(lambda: _counters(p)["accepted"] - probes == n, timeout=5, what="the stalled clients' accept")
        took = []
        for _ in range(3):
            started = time.monotonic()
            assert https_get(port, "example.com", timeout=5) == "backend=a\n"
            took.append(time.monotonic() - started)
        poller = select.poll()                                  # (select() stops at fd 1023)
        index = {s.fileno(): i for i, s in enumerate(stalled)}
        for s in stalled:
            poller.register(s, select.POLLIN)
        # Served while every stalled client was still held: none had been closed yet.
        assert poller.poll(0) == []
        assert max(took) < 1.0, took

        closed_at, read = {}, {}
        deadline = connected[-1] + 2 * limit + 1
        while len(closed_at) < n and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                i = index[fd]
                closed_at[i] = time.monotonic()
                try:
                    read[i] = stalled[i].recv(64)
                except ConnectionResetError:
                    read[i] = "reset"
                poller.unregister(fd)
        assert len(closed_at) == n, f"{n - len(closed_at)} stalled clients still open after {2 * limit + 1}s"
        assert set(read.values()) == {b""}                       # a plain close, no answer, no reset
        waited = sorted(closed_at[i] - connected[i] for i in range(n))
        # The timer starts at accept, right after connect (less the event loop's cached clock).
        assert limit - 0.1 <= waited[0] and waited[-1] <= 2 * limit, (waited[0], waited[-1])
    finally:
        for s in stalled:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    counters = stats(p)
    assert counters["refused_client_hello_timeout"] == n
    assert counters["relayed_userspace"] == 3 and counters["errors"] == 0
    assert a.accepted == 3                                       # no stalled client reached it


# --- 2. failing backends -----------------------------------------------------------

class _ResettingBackend:
    """Accepts, reads the client's whole first flight (HELLO), then closes with
    SO_LINGER 0: a reset right after the first flight."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        # However long the master takes to start (a kernel-mode start under load: 10 s
        # and more), until close().
        while not select.select([self.sock], [], [], 0.1)[0]:
            if self.closing.is_set():
                return
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while len(data) < len(HELLO) and (chunk := conn.recv(len(HELLO) - len(data))):
                    data += chunk
                time.sleep(0.05)                  # anything relayed beyond the first flight shows up now
                conn.setblocking(False)
                try:
                    data += conn.recv(65536)
                except BlockingIOError:
                    pass
            finally:
                self.received.append(data)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def close(self):
        self.closing.set()
        self.thread.join(10)
        self.sock.close()


class _Blackhole:
    """A listening socket (backlog 1) whose accept queue is full of connections never
    accepted: a further SYN is dropped, as by a host that does not answer."""
    BACKLOG = 1

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=self.BACKLOG)
        self.port = self.sock.getsockname()[1]
        self.fillers = [socket.create_connection(("127.0.0.1", self.port), timeout=5)
                        for _ in range(self.BACKLOG + 1)]
        listeners = accept_queues(self.port)
        assert listeners[0][1] == self.BACKLOG + 1 == len(self.fillers), listeners   # full

    def accepted_afterwards(self) -> list[tuple[tuple, bytes | None]]:
        """Everything that reached the queue: (peer, bytes it sent, or None)."""
        self.sock.setblocking(False)
        found = []
        while True:
            try:
                conn, peer = self.sock.accept()
            except BlockingIOError:
                return found
            with conn:
                try:
                    found.append((peer, conn.recv(65536, socket.MSG_DONTWAIT)))
                except BlockingIOError:
                    found.append((peer, None))

    def close(self):
        for s in self.fillers:
            s.close()
        self.sock.close()


@pytest.mark.parametrize("kind", ["refused", "reset", "blackhole"])
@pytest.mark.parametrize("mode", MODES)
def test_a_failing_backend_closes_the_client_promptly_and_leaves_nothing(proxy, backends, pin_path, tmp_path,
                                                                          mode, kind):
    """A backend that refuses (no listener), one that resets right after the first
    flight, and one that never answers a SYN: the client is closed at once (the
    blackhole: at timeouts.connect), the access log names the outcome, the backend
    gets the first flight at most, and the worker keeps no descriptor and (kernel
    relay) no map entry of the connection."""
    connect_timeout = 1.0
    a = backends("a")
    if kind == "refused":
        bad = socket.socket()                     # bound, never listening: the port stays ours, and refuses
        bad.bind(("127.0.0.1", 0))
        bad_port = bad.getsockname()[1]
    elif kind == "reset":
        bad = _ResettingBackend()
        bad_port = bad.port
    else:
        bad = _Blackhole()
        bad_port = bad.port
    access = tmp_path / "access.log"
    port = free_port()
    try:
        p = proxy(_config(port, [("example.com", a.address), (HELLO_NAME, f"127.0.0.1:{bad_port}")], mode,
                          pin_path, workers=1,
                          extra=f'[timeouts]\nconnect = {connect_timeout}\n[log]\naccess = "{access}"\n'),
                  wait_ports=(port,))
        [worker] = p.worker_pids()
        # Once the worker has served a relayed connection, whatever it opens once is open.
        assert https_get(port, "example.com") == "backend=a\n"
        wait_until(lambda: _access_records(access, "example.com"), what="the first connection's end")
        if mode == "require":
            assert stats(p)["relayed_kernel"] == 1
            wait_until(lambda: entries(pin_path, "SOCK_MAP") == entries(pin_path, "CONNECTION_MAP") == 0,
                       what="the first pair to leave the maps")
        fds_before = _fds(worker)

        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            started = time.monotonic()
            client.sendall(HELLO)
            try:
                answer = client.recv(4096)
            except ConnectionResetError:
                answer = "reset"
            closed_after = time.monotonic() - started
        wait_until(lambda: _access_records(access, HELLO_NAME), timeout=5, what="the access log record")
        [record] = _access_records(access, HELLO_NAME)
        bad_address = f"127.0.0.1:{bad_port}"

        if kind == "refused":
            assert closed_after < 0.5 and answer == b""            # at once, and nothing said
            assert record["outcome"] == f"refused:connect_failed:_{bad_address}:_[Errno_111]_Connection_refused"
            assert (record["up"], record["down"], record["relay"]) == ("0", "0", "-")
            assert stats(p)["refused_connect_failed"] == 1
        elif kind == "reset":
            assert closed_after < 0.5 and answer in (b"", "reset")
            assert bad.received == [HELLO]                         # the first flight whole, nothing beyond
            assert record["outcome"] == "reset" and record["backend"] == bad_address
            assert (record["up"], record["down"]) == (str(len(HELLO)), "0")
            # The kernel relay declines a pair whose upstream was reset before it
            # registered it (a socket no longer ESTABLISHED): the userspace relay ends it.
            assert record["relay"] in ({"kernel", "userspace"} if mode == "require" else {"userspace"})
            assert stats(p)[f"relayed_{record['relay']}"] == 2
        else:
            assert connect_timeout - 0.05 <= closed_after < connect_timeout + 1 and answer == b""
            assert record["outcome"] == f"refused:connect_failed:_{bad_address}:_timed_out"
            assert stats(p)["refused_connect_failed"] == 1
            # The proxy gave up on its SYN: what reached the queue is the fillers, without a byte.
            found = bad.accepted_afterwards()
            assert sorted(peer for peer, _ in found) == sorted(f.getsockname() for f in bad.fillers)
            assert [data for _, data in found] == [None] * len(bad.fillers)
        assert stats(p)["errors"] == 0
        assert _fds(worker) == fds_before
        if mode == "require":
            assert (entries(pin_path, "SOCK_MAP"), entries(pin_path, "CONNECTION_MAP")) == (0, 0)
        # And the worker still serves.
        assert https_get(port, "example.com") == "backend=a\n"
    finally:
        bad.close()


# --- 3. a worker killed mid-transfer -------------------------------------------------

def _transfer(sock: socket.socket, payload: bytes, halfway: threading.Event | None = None,
              go: threading.Event | None = None, window: int = 256 << 10) -> str:
    """Send payload through the echo backend a window at a time, reading each window's
    echo before the next; at the halfway mark set `halfway` and wait for `go`. Then
    half-close and read to EOF. The outcome: "intact", "eof" (closed before all came
    back), "corrupt", "reset" or "timeout" (the socket's timeout: a hang)."""
    view, received = memoryview(payload), bytearray()
    try:
        for offset in range(0, len(payload), window):
            if halfway is not None and offset >= len(payload) // 2 and not halfway.is_set():
                halfway.set()
                if not go.wait(30):
                    return "no go"
            sock.sendall(view[offset:offset + window])
            while len(received) < min(offset + window, len(payload)):
                chunk = sock.recv(1 << 18)
                if not chunk:
                    return "eof"
                received += chunk
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(1 << 18):
            received += chunk
    except TimeoutError:
        return "timeout"
    except OSError:
        return "reset"
    return "intact" if sha(received) == sha(payload) else "corrupt"


def _recv_ready(sock: socket.socket) -> bytes:
    """What has arrived on sock (a socket with a timeout waits even with MSG_DONTWAIT)."""
    return sock.recv(4096) if select.select([sock], [], [], 0)[0] else b""


@pytest.mark.parametrize("mode", MODES)
def test_a_killed_worker_loses_only_its_own_connections(proxy, plain, pin_path, mode):
    """Two workers, transfers on both. One is stopped (SIGSTOP), new connections arrive,
    some of them in its accept queue, then it is killed (SIGKILL) mid-transfer: the
    other worker's transfers complete intact, the killed worker's connections end
    (EOF or reset, not a hang), and the connections that waited in its queue are
    served intact by its replacement: the master holds each slot's listening socket.
    With the kernel relay, the killed worker's transfers complete too (keeper.py)."""
    per_worker, size, timeout = 2, 8 << 20, 10
    echo = plain("echo")
    port = free_port()
    p = proxy(_config(port, [], mode, pin_path, fallback=echo.address, workers=2), wait_ports=(port,))
    workers = p.worker_pids()
    assert len(workers) == 2
    victim, survivor = workers
    opened: list[socket.socket] = []
    fresh: list[socket.socket] = []
    threads, go = [], threading.Event()
    try:
        # Transfers under way on both workers.
        owner: dict[socket.socket, int] = {}
        while min(list(owner.values()).count(w) for w in workers) < per_worker and len(opened) < 40:
            c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            opened.append(c)
            assert _echo(c, b"\x00first flight") == b"\x00first flight"
            if list(owner.values()).count(w := _owner(c, workers)) < per_worker:
                owner[c] = w
        assert sorted(owner.values()) == sorted(workers * per_worker)
        halfway = {c: threading.Event() for c in owner}
        outcomes: dict[socket.socket, str] = {}

        def run(c):
            outcomes[c] = _transfer(c, b"\x00" + os.urandom(size - 1), halfway[c], go)
        for c in owner:
            threads.append(threading.Thread(target=run, args=(c,), daemon=True))
            threads[-1].start()
        for c in owner:
            assert halfway[c].wait(timeout), "a transfer did not reach its halfway mark"

        # The victim stops accepting: new connections on its slot wait in its queue.
        os.kill(victim, signal.SIGSTOP)
        wait_until(lambda: _process_state(victim) == "T", timeout=5, what="the victim to stop")
        greeting = [b"\x00queued %02d" % i for i in range(40)]
        echoed = {}

        def settled():
            for i, c in enumerate(fresh):
                echoed[i] = echoed.get(i, b"") + _recv_ready(c)
            served = sum(echoed[i] == greeting[i] for i in range(len(fresh)))
            return served + _accept_queue(port, victim) == len(fresh)
        deadline = time.monotonic() + 20
        while _accept_queue(port, victim) < 3 and len(fresh) < 40 and time.monotonic() < deadline:
            fresh.append(socket.create_connection(("127.0.0.1", port), timeout=timeout))
            fresh[-1].sendall(greeting[len(fresh) - 1])
            wait_until(settled, timeout=5, what="each new connection served or queued")
        queued = [i for i in range(len(fresh)) if echoed[i] != greeting[i]]
        assert len(queued) == _accept_queue(port, victim) >= 3
        for i in set(range(len(fresh))) - set(queued):
            assert _owner(fresh[i], p.worker_pids()) == survivor

        os.kill(victim, signal.SIGKILL)
        # Its descriptors are closed once it is a zombie. Before that, the kernel relay
        # may still carry its pairs' bytes: the verdict needs no process.
        wait_until(lambda: _process_state(victim) in ("Z", "gone"), timeout=5, what="the victim to die")
        go.set()
        for t in threads:
            t.join(2 * timeout)
        assert not any(t.is_alive() for t in threads), "a transfer hung"
        assert [outcomes[c] for c in owner if owner[c] == survivor] == ["intact"] * per_worker
        if mode == "require":   # the master keeps kernel-relayed pairs: another worker adopts them
            assert [outcomes[c] for c in owner if owner[c] == victim] == ["intact"] * per_worker
        else:
            assert {outcomes[c] for c in owner if owner[c] == victim} <= {"eof", "reset"}

        def replaced():
            pids = p.worker_pids()      # once: the victim may be reaped between two calls
            return len(pids) == 2 and victim not in pids and pids
        pids = wait_until(replaced, timeout=10, what="a replacement worker")
        assert survivor in pids, "the other worker was replaced too"
        [replacement] = set(pids) - {survivor}

        fresh_outcomes: dict[int, tuple[bytes, int | None, str]] = {}

        def serve_fresh(i):
            c = fresh[i]
            got = echoed[i]
            try:
                while len(got) < len(greeting[i]) and (chunk := c.recv(64)):
                    got += chunk
                served_by = _owner(c, p.worker_pids()) if got == greeting[i] else None
            except (OSError, AssertionError) as e:
                fresh_outcomes[i] = (got, None, f"error {e!r}")
                return
            fresh_outcomes[i] = (got, served_by, _transfer(c, b"\x00" + os.urandom((2 << 20) - 1)))
        fresh_threads = [threading.Thread(target=serve_fresh, args=(i,), daemon=True) for i in range(len(fresh))]
        for t in fresh_threads:
            t.start()
        for t in fresh_threads:
            t.join(2 * timeout)
        assert not any(t.is_alive() for t in fresh_threads), "a transfer hung"
        assert [fresh_outcomes[i][2] for i in range(len(fresh))] == ["intact"] * len(fresh), \
            f"queued {queued}, the victim {victim}, replaced by {replacement}; (greeting, served by, outcome) " \
            f"{fresh_outcomes}; log:\n{p.output()[-3000:]}"
        assert all(fresh_outcomes[i][0] == greeting[i] for i in range(len(fresh)))
        assert [fresh_outcomes[i][1] for i in queued] == [replacement] * len(queued)
        if mode == "require":
            assert stats(p)["relayed_userspace"] == 0
    finally:
        go.set()
        if _process_state(victim) == "T":    # a failure left it stopped: let it stop with the rest
            os.kill(victim, signal.SIGCONT)
        for c in opened + fresh:
            c.close()
