"""Real parts for process tests: TLS backends, dnsmasq, and the proxy's master itself."""
from __future__ import annotations

import ctypes
import hashlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import procs  # noqa: E402 - the repository's root, for the bench's helpers
MASTER = [str(ROOT / ".venv/bin/sniproxy-master")] if (ROOT / ".venv/bin/sniproxy-master").exists() \
    else [sys.executable, "-m", "sniproxy.cli"]
CERT_NAMES = ("example.com", "*.example.com", "*.test", "*.wild.test", "localhost")


_HANDED_OUT: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, outside the ephemeral range (bench/procs.py), and one
    this process has not handed out before: two listeners of one test would clash."""
    while True:
        port = procs.free_port(host)
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port


def accept_queues(*ports: int) -> list[tuple[str, int]]:
    """The listening sockets on these ports, as (ss -ltnp line, connections waiting in its
    accept queue): Recv-Q of a listening socket is its accept queue."""
    filter_ = " or ".join(f"sport = :{port}" for port in ports)
    out = subprocess.run(["ss", "-ltnpH", f"( {filter_} )"], capture_output=True, text=True, check=True).stdout
    return [(line, int(line.split()[1])) for line in out.splitlines()]


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """predicate()'s first true value; what names the wait, or is called for it (a
    callable, so a timeout can say what was last seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what() if callable(what) else what}")


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for every name the tests route."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        san = ",".join(f"DNS:{n}" for n in CERT_NAMES) + ",IP:127.0.0.1,IP:::1"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=example.com",
                        "-addext", f"subjectAltName={san}"], check=True, capture_output=True)
    return cert, key


def serve_in_threads(listening: socket.socket, handle) -> None:
    """Accept on listening until stop_serving(listening), each connection handled in a thread
    of its own."""
    def serve() -> None:
        while True:
            try:
                conn, _ = listening.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()


def stop_serving(listening: socket.socket) -> None:
    """Close a listening socket that serve_in_threads accepts on. shutdown() first: it wakes
    the acceptor thread's accept(), which close() alone does not, and leaves no thread waiting
    on a number that another socket may take."""
    try:
        listening.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    listening.close()


class Backend:
    """A real server on loopback, plain TCP or TLS. An HTTP GET gets "backend=<label>"
    back; anything else is echoed byte for byte until the client half-closes."""

    def __init__(self, label: str, host: str = "127.0.0.1", greeting: bytes = b"",
                 cert: tuple[Path, Path] | None = None):
        self.label = label
        self.greeting = greeting          # sent the instant a connection is accepted (server speaks first)
        self.ctx = None
        self.sni: list[str | None] = []
        if cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(*map(str, cert))
            self.ctx.set_alpn_protocols(["http/1.1"])
            self.ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.accepted = 0
        serve_in_threads(self.sock, self._handle)

    def _handle(self, raw: socket.socket) -> None:
        self.accepted += 1
        self._answer(raw)

    def _answer(self, raw: socket.socket) -> None:
        try:
            with (self.ctx.wrap_socket(raw, server_side=True) if self.ctx else raw) as conn:
                if self.greeting:
                    conn.sendall(self.greeting)
                data = conn.recv(65536)
                if data.startswith(b"GET "):
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    body = f"backend={self.label}\n".encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                                 % (len(body), body))
                    return
                while data:
                    conn.sendall(data)
                    data = conn.recv(262144)
        except (OSError, ssl.SSLError):
            raw.close()

    def close(self) -> None:
        stop_serving(self.sock)


def tls_client(port: int, name: str | None, host: str = "127.0.0.1", timeout: float = 10.0,
               alpn=("http/1.1",), source: tuple[str, int] | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    raw = socket.create_connection((host, port), timeout=timeout, source_address=source)
    return ctx.wrap_socket(raw, server_hostname=name)


def https_get(port: int, name: str | None, host: str = "127.0.0.1", timeout: float = 10.0, **client) -> str:
    """GET / through the proxy with Python's ssl; the backend's answer body. client:
    tls_client's alpn (protocols offered) and source (the address to connect from)."""
    with tls_client(port, name, host, timeout, **client) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    _, headers_end, body = data.partition(b"\r\n\r\n")
    assert headers_end, f"the answer ended before its headers: {data[:200]!r}"
    return body.decode()


def curl(port: int, name: str, *extra: str, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sk", "--max-time", "10", "--resolve", f"{name}:{port}:{host}",
                           f"https://{name}:{port}/", *extra], capture_output=True, text=True)


def echo_through(port: int, name: str, payload: bytes, host: str = "127.0.0.1", window: int = 1 << 20) -> bytes:
    """Send payload over TLS through the proxy and read the echo back, at most
    `window` bytes ahead."""
    with tls_client(port, name, host, timeout=60) as s:
        return echo_over(s, payload, window=window)


def echo_over(s: ssl.SSLSocket, payload: bytes, sent: int = 0, received: bytearray | None = None,
              window: int = 1 << 20) -> bytes:
    """Go on from the first `sent` bytes of payload over s: read their echo back into received,
    then send the rest, at most `window` bytes ahead of the echo. One thread: an SSL socket
    shared by a sender and a reader thread breaks now and then under load (a read that
    returns EOF early). The echo, short if the connection ended early."""
    received = bytearray() if received is None else received
    view = memoryview(payload)
    for end in (sent, *range(sent + window, len(payload) + window, window)):
        end = min(end, len(payload))
        s.sendall(view[sent:end])
        sent = end
        while len(received) < end:
            chunk = s.recv(262144)
            if not chunk:
                return bytes(received)
            received += chunk
    return bytes(received)


def stream_through(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    """Send payload in plain TCP through the proxy, then the FIN, while reading everything
    that comes back until EOF (a sender thread, so neither side waits on the other)."""
    with socket.create_connection((host, port), timeout=30) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := s.recv(1 << 20):
            received += chunk
        sender.join()
    return bytes(received)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Proxy:
    """The real master, started with `sniproxy-master start --foreground` in its own session."""

    def __init__(self, workdir: Path, config: str, name: str = "proxy"):
        self.workdir = workdir
        self.path = workdir / f"{name}.toml"
        self.log = workdir / f"{name}.log"
        self.pidfile = workdir / f"{name}.pid"
        self.write(config)
        self.proc: subprocess.Popen | None = None

    def write(self, config: str) -> None:
        if "pidfile" not in config:
            config = f'[master]\npidfile = "{self.pidfile}"\n' + config if "[master]" not in config \
                else config.replace("[master]\n", f'[master]\npidfile = "{self.pidfile}"\n', 1)
        tmp = self.path.with_suffix(".new")   # whole, or not at all, for a master that reloads now
        tmp.write_text(config)
        tmp.replace(self.path)

    def reload(self, config: str | None = None, timeout: float = 15) -> None:
        """Write config (if given), send SIGHUP, and wait until the master has taken it or
        rejected it, so that reloads never overtake one another."""
        if config is not None:
            self.write(config)
        handled = lambda: self.output().count("reloaded ") + self.output().count("reload rejected")
        before = handled()
        self.signal(signal.SIGHUP)
        wait_until(lambda: handled() > before, timeout=timeout, what="the master to handle the reload")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*MASTER, *args, "-c", str(self.path)], capture_output=True, text=True, timeout=timeout)

    def start(self, wait_ports: tuple[int, ...] = (), env: dict | None = None, wrap=lambda argv: argv) -> "Proxy":
        """wrap(argv) -> the command line to run, e.g. under capsh."""
        self.logfile = open(self.log, "ab")
        self.proc = subprocess.Popen(wrap([*MASTER, "start", "--foreground", "-c", str(self.path)]),
                                     stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env)
        wait_until(lambda: self.pidfile.exists() and self.state() or self.proc.poll() is not None,
                   timeout=30, what="the master to start")
        if self.proc.poll() is not None:
            raise RuntimeError(f"master exited with {self.proc.returncode}:\n{self.log.read_text()}")
        for port in wait_ports:
            wait_until(lambda: _accepting(port), timeout=30, what=f"port {port}")
        if wait_ports:   # the master's sockets accept before every worker has booted (and dropped privileges)
            wait_until(lambda: (self.state() or {}).get("ready"), timeout=60, what="every worker to boot")
        return self

    def state(self) -> dict | None:
        import json
        try:
            return json.loads(self.pidfile.with_suffix(".state").read_text())
        except (OSError, ValueError):
            return None

    def worker_pids(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in out.split())

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # anything the session left behind
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.logfile.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Dnsmasq:
    """A real DNS server on loopback that answers only for the names it is given."""

    def __init__(self, workdir: Path, records: dict[str, str], ttl: int = 300):
        self.port = free_port()
        self.log = workdir / "dnsmasq.log"
        args = ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-daemon",
                f"--port={self.port}", "--listen-address=127.0.0.1", "--bind-interfaces",
                f"--local-ttl={ttl}", "--log-queries", f"--log-facility={self.log}", "--pid-file=",
                "--user=root", "--cache-size=0"]
        args += [f"--host-record={name},{addr}" for name, addr in records.items()]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self.log.exists() and "started" in self.log.read_text() or self.proc.poll() is not None,
                   what="dnsmasq")
        if self.proc.poll() is not None:
            raise RuntimeError(f"dnsmasq failed: {self.proc.stderr.read().decode()}")

    def queries(self, name: str) -> int:
        return sum(1 for line in self.log.read_text().splitlines() if "query[" in line and f" {name} " in line)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class DelayedDns:
    """A UDP forwarder in front of a real DNS server that holds every answer back for
    `delay` seconds: a slow resolver, for what clients do while they wait."""

    def __init__(self, upstream_port: int, delay: float):
        self.upstream, self.delay = ("127.0.0.1", upstream_port), delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                query, client = self.sock.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._answer, args=(query, client), daemon=True).start()

    def _answer(self, query: bytes, client) -> None:
        time.sleep(self.delay)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
            up.settimeout(5)
            up.sendto(query, self.upstream)
            try:
                self.sock.sendto(up.recv(4096), client)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


class Haproxy:
    """A real HAProxy (tcp mode) on loopback, run in the foreground; its log is its stdout."""

    def __init__(self, workdir: Path, config: str, ports: tuple[int, ...]):
        self.path, self.log = workdir / "haproxy.cfg", workdir / "haproxy.log"
        self.path.write_text("global\n  log stdout format raw local0\n"
                             "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n"
                             "  timeout client 30s\n  timeout server 30s\n" + config)
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.path)], stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        try:
            for port in ports:
                wait_until(lambda: _accepting(port) or self.proc.poll() is not None, what=f"haproxy on {port}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy failed: {self.log.read_text()}")
        except BaseException:
            self.close()
            raise

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def cpu_seconds(pids) -> float:
    """utime + stime of the given processes, in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def through_proxy(port: int, backend: socket.socket, first: bytes):
    """A client of the proxy on port, whose first flight reached the listening socket
    backend (its fallback, say): yields (client, the backend's end of it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(first)
        conn, _ = backend.accept()
        with conn:
            conn.settimeout(10)
            got = b""
            while len(got) < len(first) and (chunk := conn.recv(len(first) - len(got))):
                got += chunk
            assert got == first
            yield client, conn


def run_relay(relay, client, upstream, idle: float = 30.0, half_closed: float | None = None):
    """The blocking form of relay.start(), for tests: wait in this greenlet for the
    RelayResult. A greenlet killed while it waits cancels the relay."""
    from gevent.event import AsyncResult

    from sniproxy.relay import Limits
    done = AsyncResult()
    handle = relay.start(client, upstream, Limits(idle, half_closed), done.set)
    try:
        return done.get()
    except BaseException:
        handle.cancel()
        raise


# --- socket endpoints for relay and connection tests in this process -------------

MiB = 1 << 20


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected loopback TCP sockets (blocking): (connecting end, accepted end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


class Background(threading.Thread):
    """fn(*args) in an OS thread, so that it may block while this thread runs the
    gevent hub; join() returns its result or raises its exception."""

    def __init__(self, fn, *args):
        super().__init__(daemon=True)
        self.fn, self.args, self.result, self.error = fn, args, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:  # noqa: BLE001 - handed to join()
            self.error = e

    def join(self, timeout: float = 30):
        super().join(timeout)
        assert not self.is_alive(), f"{self.fn.__name__} still running"
        if self.error:
            raise self.error
        return self.result


def send_stream(sock: socket.socket, size: int, seed: int, shut: bool = True) -> str:
    """size pseudo-random bytes (then SHUT_WR if shut); returns their sha256."""
    import random
    block = random.Random(seed).randbytes(MiB)
    digest, left = hashlib.sha256(), size
    while left:
        chunk = block[:min(left, len(block))]
        sock.sendall(chunk)
        digest.update(chunk)
        left -= len(chunk)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return digest.hexdigest()


def recv_stream(sock: socket.socket) -> tuple[int, str]:
    """Everything until EOF: (length, sha256)."""
    digest, total = hashlib.sha256(), 0
    while data := sock.recv(4 * MiB):
        digest.update(data)
        total += len(data)
    return total, digest.hexdigest()


def bulk_both_ways(relay, pair, up: int, down: int):
    """Send up and down bytes at once through relay, between the ends of the pair fixture,
    each side closing when done; check both by sha256. Returns the RelayResult."""
    client, c, u, server = pair
    jobs = [Background(send_stream, client, up, 1), Background(recv_stream, server),
            Background(send_stream, server, down, 2), Background(recv_stream, client)]
    result = run_relay(relay, c, u, idle=20)
    up_sent, up_got, down_sent, down_got = (job.join() for job in jobs)
    assert up_got == (up, up_sent) and down_got == (down, down_sent)
    return result


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := sock.recv(n - len(data))):
        data += chunk
    return data


def recv_nowait(sock) -> bytes | None:
    """What is queued on sock now (b"" at EOF), or None when nothing is."""
    timeout = sock.gettimeout()
    sock.setblocking(False)   # with a timeout, Python would wait out EAGAIN even under MSG_DONTWAIT
    try:
        return sock.recv(MiB)
    except BlockingIOError:
        return None
    finally:
        sock.settimeout(timeout)


def hub_wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    """wait_until for tests whose subject runs in this thread's gevent hub: it sleeps
    cooperatively, so the hub's callbacks run meanwhile."""
    import gevent
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        gevent.sleep(0.002)
    return value


# --- packets on lo -------------------------------------------------------------------

class Segment(NamedTuple):
    at: float          # the kernel's receive timestamp, in seconds
    sport: int
    dport: int
    flags: int
    seq: int
    header: bytes      # the TCP header
    payload: bytes


class LoopbackCapture:
    """TCP segments on lo to or from one port, as received, from creation on. The kernel
    filters them (classic BPF) into a 64 MiB buffer: lo also carries the bulk traffic of
    the tests running beside this one, which would otherwise fill the buffer and drop the
    few segments a test is about."""

    SO_ATTACH_FILTER, SO_RCVBUFFORCE, SO_TIMESTAMPNS = 26, 33, 35   # not in Python's socket module

    def __init__(self, port: int):
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        program = [                       # a SOCK_DGRAM packet socket filters from the IP header
            (0x20, 0, 0, 0xFFFFF004),     # ld the packet's type
            (0x15, 8, 0, socket.PACKET_OUTGOING),   # lo shows each packet twice: keep it as received
            (0x30, 0, 0, 9),              # ldb [9]: the protocol
            (0x15, 0, 6, socket.IPPROTO_TCP),
            (0xB1, 0, 0, 0),              # ldxb 4*([0]&0xf): the IP header's length
            (0x48, 0, 0, 0),              # ldh [x+0]: the source port
            (0x15, 2, 0, port),
            (0x48, 0, 0, 2),              # ldh [x+2]: the destination port
            (0x15, 0, 1, port),
            (0x06, 0, 0, 0x40000),        # keep the whole packet
            (0x06, 0, 0, 0),              # drop it
        ]
        code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_ATTACH_FILTER,
                             struct.pack("HL", len(program), ctypes.addressof(code)))
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_RCVBUFFORCE, 64 * MiB)
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_TIMESTAMPNS, 1)
        self.sock.bind(("lo", 0x0800))
        self.sock.setblocking(False)
        self.seen: list[Segment] = []

    def segments(self) -> list[Segment]:
        """Every segment captured so far."""
        while True:
            try:
                packet, ancillary, _, _ = self.sock.recvmsg(65536, 64)
            except BlockingIOError:
                return self.seen
            seconds, nanoseconds = struct.unpack("qq", ancillary[0][2][:16])
            ip_len = (packet[0] & 0xF) * 4
            tcp = packet[ip_len:struct.unpack_from("!H", packet, 2)[0]]
            sport, dport, seq = struct.unpack_from("!HHI", tcp)
            header = tcp[:(tcp[12] >> 4) * 4]
            self.seen.append(Segment(seconds + nanoseconds / 1e9, sport, dport, tcp[13], seq, header, tcp[len(header):]))

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()
