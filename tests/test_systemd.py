"""systemd: the notifications of a Type=notify service, and the unit file."""
import os
import signal
import socket
import subprocess

from harness import ROOT, free_port, https_get
from test_proxy import make_config


def test_ready_reloading_and_stopping_reach_notify_socket(proxy, backends, tmp_path):
    a = backends("a")
    port = free_port()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(15)
    p = proxy(make_config(port, [("example.com", a.address)]), start=False)
    p.start(wait_ports=(port,), env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})

    def message() -> dict:
        return dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
    ready = message()
    assert ready["READY"] == "1" and ready["STATUS"].startswith("2 workers, relay userspace")
    assert len(p.worker_pids()) == 2 and https_get(port, "example.com") == "backend=a\n"
    p.signal(signal.SIGHUP)
    reloading = message()
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert message()["READY"] == "1"        # once the new workers are up
    p.write("[master]\nworkers = -1\n")
    p.signal(signal.SIGHUP)
    assert message()["RELOADING"] == "1"
    rejected = message()
    assert rejected["READY"] == "1" and rejected["STATUS"].startswith("reload rejected: ")
    p.signal(signal.SIGTERM)
    assert message()["STOPPING"] == "1"
    assert p.stop() == 0
    sock.close()


def test_the_unit_file_verifies(tmp_path):
    unit = tmp_path / "sniproxy.service"
    unit.write_text((ROOT / "etc/sniproxy.service").read_text().replace("/opt/sniproxy", str(ROOT))
                    .replace("/etc/sniproxy/sniproxy.toml", str(ROOT / "etc/sniproxy.toml")))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert out.returncode == 0 and "sniproxy.service" not in out.stderr, out.stderr
    text = unit.read_text()
    assert "Type=notify" in text and "ExecReload=" in text and "CapabilityBoundingSet=" in text
