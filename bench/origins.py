"""The backends every system routes to: an nginx TLS origin (self-signed, made at run
time) that also holds idle plain connections, an iperf3 server and a sockperf server."""

import contextlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from bench import procs
from sniproxy import bpfload

SNI_NAME = "origin.bench.test"
BIG_FILE = "big"
SMALL_FILE = "small"
OBJECTS = {"16k": 16 << 10, "256k": 256 << 10}   # what many keep-alive clients fetch (scenario "active")

NGINX_ORIGIN = """\
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {dir}/origin-nginx.pid;
error_log stderr warn;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {dir}/origin.crt;
        ssl_certificate_key {dir}/origin.key;
        root {dir}/www;
    }}
    # Idle connections send an unfinished request line; wait for the rest a long time.
    server {{
        listen 127.0.0.1:{hold_port};
        client_header_timeout 600s;
        return 204;
    }}
}}
"""


@dataclass(frozen=True)
class Origins:
    tls: int        # nginx HTTPS, serves /big and /small, certificate for SNI_NAME
    hold: int       # nginx plain HTTP that keeps idle connections open
    iperf: int
    sockperf: int

    def fallback_ports(self) -> dict[str, int]:
        """The routes that non-TLS clients take, by name: each proxy listener falls back to one."""
        return {"iperf": self.iperf, "sockperf": self.sockperf, "hold": self.hold}


def start(workdir: Path, download_bytes: int, nofile: int) -> Origins:
    origins = Origins(tls=procs.free_port(), hold=procs.free_port(),
                      iperf=procs.free_port(), sockperf=procs.free_port())
    www = workdir / "www"
    www.mkdir()
    with open(www / BIG_FILE, "wb") as big:
        big.truncate(download_bytes)  # sparse: reads come from the zero page, not the disk
    with open(www / BIG_FILE, "rb") as big:
        # ... once it is in the page cache: the run's first download (direct's first repeat)
        # filled it, at 350-400 MB/s against 900-1,300 for the repeats after it.
        buffer = bytearray(1 << 20)
        while big.readinto(buffer):
            pass
    (www / SMALL_FILE).write_bytes(b"x" * 128)
    for name, size in OBJECTS.items():
        (www / name).write_bytes(b"x" * size)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={SNI_NAME}", "-addext", f"subjectAltName=DNS:{SNI_NAME}",
                    "-keyout", str(workdir / "origin.key"), "-out", str(workdir / "origin.crt")],
                   check=True, capture_output=True, timeout=30)
    conf = workdir / "origin-nginx.conf"
    conf.write_text(NGINX_ORIGIN.format(dir=workdir, nofile=nofile,
                                        tls_port=origins.tls, hold_port=origins.hold))
    servers = [
        (["nginx", "-p", str(workdir), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
         [origins.tls, origins.hold], "origin-nginx.log"),
        # --idle-timeout: a client that dies mid-test must not leave the server busy for good.
        (["iperf3", "-s", "-B", "127.0.0.1", "-p", str(origins.iperf), "--idle-timeout", "20",
          "-I", str(workdir / "origin-iperf3.pid")],
         [origins.iperf], "origin-iperf3.log"),
        (["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(origins.sockperf)],
         [origins.sockperf], "origin-sockperf.log"),
    ]
    for argv, ports, log_name in servers:
        log = workdir / log_name
        proc = procs.spawn(argv, log)
        try:
            procs.wait_listening(proc, ports, log, timeout=10)
        except RuntimeError as exc:
            raise RuntimeError(f"origin {argv[0]} failed to start: {exc}") from exc
    return origins


@contextlib.contextmanager
def running(prefix: str, download_bytes: int = 1 << 20, nofile: int = 4096) -> Iterator[tuple[Path, Origins]]:
    """For a measuring tool: a scratch directory (readable by nginx's workers, which run as
    nobody) with the origins started in it. Afterwards every child the bench started is
    stopped and the directory removed."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    # What a bench run killed outright left pinned (its proxies' pin directories carry its pid).
    bpfload.remove_orphaned("sniproxy-benchrun")
    try:
        yield workdir, start(workdir, download_bytes, nofile)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
