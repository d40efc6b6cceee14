"""The systems under test. Each routes the same names: SNI_NAME to the TLS origin, and
anything that is not TLS to its listener's fallback. A proxy has one listener per
fallback route ("iperf", "sockperf", "hold"); the "tls" route uses any of them."""

import os
import secrets
import shutil
import socket
import time
from pathlib import Path

from bench import measure, procs
from bench.origins import SNI_NAME, Origins

REPO = Path(__file__).resolve().parent.parent
MASTER = REPO / ".venv/bin/sniproxy-master"
PEERS = ("haproxy", "haproxy-splice", "nginx", "sniproxy-debian")
# --quick: the default policy against direct and the peers that led a target in a full run
# (bench/results/2026-11-27), so that it stays within two minutes on 2 vCPUs.
QUICK_SYSTEMS = ("direct", "sniproxy-auto", "haproxy", "haproxy-splice", "nginx")


class System:
    """Direct: the client talks to the origins themselves."""
    name = "direct"
    has_workers = False
    has_processes = False
    has_kernel_relay = False

    def __init__(self, origins: Origins, workdir: Path):
        self.origins, self.workdir = origins, workdir

    def start(self, workers: int = 1) -> None:
        pass

    def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    def address(self, route: str) -> tuple[str, int]:
        if route == "tls":
            return "127.0.0.1", self.origins.tls
        return "127.0.0.1", self.origins.fallback_ports()[route]


class Proxy(System):
    """A proxy run in the foreground as a child, on free loopback ports, from a generated config."""
    has_workers = True
    has_processes = True
    stop_grace = 3.0

    def __init__(self, origins: Origins, workdir: Path):
        super().__init__(origins, workdir)
        self._proc = None
        self._ports: dict[str, int] = {}

    def config(self, workers: int) -> str:
        raise NotImplementedError

    def command(self, config_path: Path) -> list[str]:
        raise NotImplementedError

    def listeners(self) -> list[tuple[int, int]]:
        """(front port, fallback port) per listener."""
        fallbacks = self.origins.fallback_ports()
        return [(port, fallbacks[route]) for route, port in self._ports.items()]

    def start(self, workers: int = 1) -> None:
        self._ports = {}
        for route in self.origins.fallback_ports():   # each its own: two random draws may meet
            while (port := procs.free_port()) in self._ports.values():
                pass
            self._ports[route] = port
        config_path = self.workdir / f"{self.name}.conf"
        config_path.write_text(self.config(workers))
        log = self.workdir / f"{self.name}.log"
        argv = self.command(config_path)
        if not shutil.which(argv[0]):
            raise RuntimeError(f"{argv[0]} not found")
        self._proc = procs.spawn(argv, log)
        try:
            procs.wait_listening(self._proc, list(self._ports.values()), log, timeout=30)
            self._wait_serving(workers, log, timeout=30)
        except RuntimeError:
            self.stop()
            raise

    def _wait_serving(self, workers: int, log: Path, timeout: float) -> None:
        """A port may listen before anything serves it (a master binds before its workers
        are ready): wait for requests routed through the proxy to be answered, enough in a
        row that every worker's share of the listening sockets has answered too."""
        wanted, in_a_row = 4 * workers, 0
        deadline = time.monotonic() + timeout
        while in_a_row < wanted:
            if self._proc.poll() is not None:
                raise RuntimeError(f"exited {self._proc.returncode}: {procs.log_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not serving after {timeout:.0f} s: {procs.log_tail(log)}")
            if self._answers(self.address("hold")):
                in_a_row += 1
            else:
                in_a_row = 0
                time.sleep(0.1)

    @staticmethod
    def _answers(address: tuple[str, int]) -> bool:
        """One complete request through the fallback route to the hold origin (HTTP 204)."""
        try:
            with socket.create_connection(address, timeout=1.0) as sock:
                sock.sendall(b"GET /ready HTTP/1.0\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 204")
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc:
            procs.stop(self._proc, grace=self.stop_grace)
            self._proc = None

    def pids(self) -> list[int]:
        return measure.process_tree(self._proc.pid) if self._proc else []

    def address(self, route: str) -> tuple[str, int]:
        return "127.0.0.1", self._ports["iperf" if route == "tls" else route]


class Sniproxy(Proxy):
    """This project's proxy, by relay.policy: "auto" (the default, with BPF: each connection
    in the relay that suits it), or one relay for every connection: "kernel" (with BPF),
    "copy" or "splice" (without)."""
    stop_grace = 4.0

    def __init__(self, origins: Origins, workdir: Path, policy: str, source: tuple[str, Path] | None = None):
        """source: (revision, its tree) to run instead of this checkout's (bench/connrate --against)."""
        super().__init__(origins, workdir)
        self.name = f"sniproxy-{policy}" + (f"@{source[0]}" if source else "")
        bpf_mode = "require" if policy in ("auto", "kernel") else "off"
        self.has_kernel_relay = bpf_mode == "require"
        self.bpf_mode, self.policy = bpf_mode, policy
        self._pin_path = ""
        self._source = source[1] if source else None

    def command(self, config_path: Path) -> list[str]:
        master = [str(MASTER)] if self._source is None else [
            str(REPO / ".venv/bin/python"), "-c",
            f"import sys; sys.path.insert(0, {str(self._source)!r}); from sniproxy.cli import main; sys.exit(main())"]
        return [*master, "start", "-c", str(config_path), "--foreground"]

    def kernel_relayed_connections(self) -> int:
        """Connections whose two sockets sit in the pinned SOCK_MAP, per `sniproxy-master maps`."""
        out = procs.run([str(MASTER), "maps", "-c", str(self.workdir / f"{self.name}.conf")], timeout=20)
        for line in out.splitlines():
            fields = line.split()
            if fields[:1] == ["SOCK_MAP"]:
                return int(fields[2]) // 2
        raise RuntimeError(f"no SOCK_MAP in `sniproxy-master maps`: {out.strip()[:200]}")

    def config(self, workers: int) -> str:
        # A pin directory of its own, so that parallel runs and other instances never meet.
        self._pin_path = f"/sys/fs/bpf/sniproxy-benchrun-{os.getpid()}-{secrets.token_hex(4)}"
        text = (f'[master]\nworkers = {workers}\npidfile = "{self.workdir / self.name}.pid"\n'
                f'graceful_timeout = 1.0\n\n'
                f'[bpf]\nmode = "{self.bpf_mode}"\npin_path = "{self._pin_path}"\n\n'
                f'[relay]\npolicy = "{self.policy}"\n\n'
                f'[timeouts]\nidle = 600.0\n\n[log]\naccess = ""\nlevel = "warning"\n\n'
                f'[[table.bench]]\nmatch = "{SNI_NAME}"\nbackend = "127.0.0.1:{self.origins.tls}"\n')
        for front, fallback in self.listeners():
            text += (f'\n[[listener]]\naddress = "127.0.0.1:{front}"\nprotocol = "tls"\n'
                     f'table = "bench"\nfallback = "127.0.0.1:{fallback}"\n')
        return text

    def stop(self) -> None:
        super().stop()
        if self._pin_path:
            shutil.rmtree(self._pin_path, ignore_errors=True)


class ConnectionLimitedProxy(Proxy):
    """A peer whose config states how many connections it may hold."""

    def __init__(self, origins: Origins, workdir: Path, max_connections: int):
        super().__init__(origins, workdir)
        self.max_connections = max_connections


class Haproxy(ConnectionLimitedProxy):
    name = "haproxy"

    def command(self, config_path: Path) -> list[str]:
        return ["haproxy", "-db", "-f", str(config_path)]

    def config(self, workers: int) -> str:
        text = (f"global\n    maxconn {self.max_connections}\n    nbthread {workers}\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n"
                "    timeout client 600s\n    timeout server 600s\n"
                f"backend origin\n    server origin 127.0.0.1:{self.origins.tls}\n")
        for front, fallback in self.listeners():
            text += (f"backend fallback_{front}\n    server fallback 127.0.0.1:{fallback}\n"
                     f"frontend listen_{front}\n    bind 127.0.0.1:{front}\n"
                     "    tcp-request inspect-delay 5s\n"
                     "    tcp-request content accept if { req.ssl_hello_type 1 }\n"
                     f"    use_backend origin if {{ req.ssl_sni -i {SNI_NAME} }}\n"
                     f"    default_backend fallback_{front}\n")
        return text


class HaproxySplice(Haproxy):
    """HAProxy as a user who wants throughput runs it: splice(2) both ways, 1 MiB pipes."""
    name = "haproxy-splice"

    # Each pipe takes two fds beside maxconn's two a connection, and HAProxy refuses to start
    # if they add up past RLIMIT_NOFILE (20,000 here, with 10,000 idle connections to hold):
    # maxconn gives up the pipes' share of the 100 spare connections it is sized with.
    maxpipes = 64

    def config(self, workers: int) -> str:
        text = super().config(workers).replace(
            f"maxconn {self.max_connections}\n", f"maxconn {self.max_connections - self.maxpipes}\n", 1)
        return text.replace(
            "global\n", f"global\n    tune.pipesize 1048576\n    maxpipes {self.maxpipes}\n", 1).replace(
            "defaults\n", "defaults\n    option splice-request\n    option splice-response\n", 1)


class Nginx(ConnectionLimitedProxy):
    name = "nginx"

    def command(self, config_path: Path) -> list[str]:
        return ["nginx", "-p", str(self.workdir), "-c", str(config_path), "-e", "stderr",
                "-g", "daemon off;"]

    def config(self, workers: int) -> str:
        # Each proxied connection takes two of nginx's connections.
        slots = 2 * self.max_connections + 64
        text = ("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                f"worker_processes {workers};\nworker_rlimit_nofile {slots};\n"
                f"pid {self.workdir}/peer-nginx.pid;\nerror_log stderr warn;\n"
                f"events {{ worker_connections {slots}; }}\nstream {{\n")
        for front, fallback in self.listeners():
            text += (f"    map $ssl_preread_server_name $backend_{front} {{\n"
                     f"        {SNI_NAME} 127.0.0.1:{self.origins.tls};\n"
                     f"        default 127.0.0.1:{fallback};\n    }}\n"
                     f"    server {{\n        listen 127.0.0.1:{front};\n        ssl_preread on;\n"
                     f"        proxy_pass $backend_{front};\n        proxy_timeout 600s;\n    }}\n")
        return text + "}\n"


class SniproxyDebian(Proxy):
    name = "sniproxy-debian"
    has_workers = False

    def command(self, config_path: Path) -> list[str]:
        return ["sniproxy", "-f", "-c", str(config_path)]

    def config(self, workers: int) -> str:
        text = (f"pidfile {self.workdir}/sniproxy-debian.pid\n"
                "error_log {\n    filename /dev/stderr\n    priority warning\n}\n"
                f"table bench {{\n    ^{SNI_NAME.replace('.', chr(92) + '.')}$ "
                f"127.0.0.1:{self.origins.tls}\n}}\n")
        for front, fallback in self.listeners():
            text += (f"listen 127.0.0.1:{front} {{\n    proto tls\n    table bench\n"
                     f"    fallback 127.0.0.1:{fallback}\n}}\n")
        return text


def all_systems(origins: Origins, workdir: Path, max_connections: int) -> list[System]:
    return [System(origins, workdir),
            *(Sniproxy(origins, workdir, policy) for policy in ("auto", "kernel", "copy", "splice")),
            Haproxy(origins, workdir, max_connections),
            HaproxySplice(origins, workdir, max_connections),
            Nginx(origins, workdir, max_connections),
            SniproxyDebian(origins, workdir)]
