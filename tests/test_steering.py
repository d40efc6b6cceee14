"""bpf.steering: bpf/steer.c chooses the worker of each new connection, in the real master,
checked with bpftool and with what the workers hold."""
import json
import os
import signal
import subprocess
import threading

import pytest
from harness import free_port, https_get, tls_client, wait_until
from test_proxy import make_config, stats_json

pytestmark = pytest.mark.bpf


def slots(pin_path: str) -> list[dict]:
    """STEER_SLOTS as bpftool dumps it (fields by name, from the map's BTF)."""
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{pin_path}/STEER_SLOTS"],
                         capture_output=True, text=True, timeout=30, check=True)
    return [entry["formatted"]["value"] for entry in json.loads(out.stdout)]


def steered(pin_path: str) -> list[int]:
    """Connections the program sent to each of the two workers' sockets of the listener."""
    return [s["steered"][0] for s in slots(pin_path)[:2]]


def held(p) -> list[int]:
    """Connections each worker holds, in slot order (the gauge is set once a second)."""
    pids = {w["index"]: str(w["pid"]) for w in p.state()["workers"]}
    live = stats_json(p)["live"]
    return [live[pids[i]]["live_connections"] for i in sorted(pids)]


def steered_proxy(proxy, backends, pin_path, bpf: str = ""):
    """A started master with two workers, [bpf] lines added: it, its port and its config."""
    a = backends("a")
    port = free_port()
    config = make_config(port, [("example.com", a.address)], mode="require", pin_path=pin_path, policy="copy",
                         bpf=bpf)
    return proxy(config, wait_ports=(port,)), port, config


def test_new_connections_fill_the_first_worker_while_it_keeps_up(proxy, backends, pin_path):
    p, port, _ = steered_proxy(proxy, backends, pin_path)
    out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", f"{pin_path}/steer_connection"],
                         capture_output=True, text=True, timeout=30, check=True)
    assert json.loads(out.stdout)["type"] == "sk_reuseport"
    before = steered(pin_path)        # the start's probe of the port
    for _ in range(30):   # one at a time: the first worker's queue never holds more than one
        assert https_get(port, "example.com") == "backend=a\n"
    assert steered(pin_path) == [before[0] + 30, 0]
    assert slots(pin_path)[0]["accepted"][0] == before[0] + 30
    assert {k: v for k, v in stats_json(p)["steering"].items() if "live" not in k} == \
        {"slot0_steered": before[0] + 30, "slot0_accepted": before[0] + 30, "slot1_steered": 0, "slot1_accepted": 0}


def test_a_stopped_worker_gets_its_backlog_and_the_next_worker_the_rest(proxy, backends, pin_path):
    p, port, _ = steered_proxy(proxy, backends, pin_path, bpf="steering_backlog = 2\n")
    first = {w["index"]: w["pid"] for w in p.state()["workers"]}[0]
    before = steered(pin_path)
    results = []
    os.kill(first, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=lambda: results.append(https_get(port, "example.com", timeout=30)))
                   for _ in range(10)]
        for t in threads:
            t.start()
        # Up to the backlog wait for the stopped worker (steered, not accepted: 0, 1, 2 waiting
        # when each came); the rest were served by the other worker meanwhile.
        wait_until(lambda: len(results) == 7, timeout=20, what="the second worker serving the rest")
        assert steered(pin_path) == [before[0] + 3, 7]
    finally:
        os.kill(first, signal.SIGCONT)
    for t in threads:
        t.join(30)
    assert results == ["backend=a\n"] * 10          # the three that waited were not lost
    assert slots(pin_path)[0]["accepted"][0] == before[0] + 3


def test_the_margin_spreads_connections_that_stay(proxy, backends, pin_path):
    p, port, _ = steered_proxy(proxy, backends, pin_path, bpf="steering_margin = 3\n")
    clients = [tls_client(port, "example.com") for _ in range(12)]
    try:
        for c in clients:   # through to the backend: each pair is held by its worker
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        # The first worker takes connections until it holds 3 more than the second.
        wait_until(lambda: sum(held(p)) == 12, what="the workers' gauges")
        first, second = held(p)
        assert abs(first - second) <= 4 and second > 0, (first, second)
        assert [s["live"] for s in slots(pin_path)[:2]] == [first, second]
    finally:
        for c in clients:
            c.close()


def test_hash_detaches_the_program_and_a_reload_brings_it_back(proxy, backends, pin_path):
    p, port, config = steered_proxy(proxy, backends, pin_path, bpf='steering = "hash"\n')
    clients = [tls_client(port, "example.com") for _ in range(24)]
    try:
        for c in clients:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
        wait_until(lambda: sum(held(p)) == 24, what="the workers' gauges")
        assert min(held(p)) > 0       # spread by the hash: all 24 on one worker has odds of 2^-23
        assert steered(pin_path) == [0, 0]
    finally:
        for c in clients:
            c.close()
    p.reload(config.replace('steering = "hash"\n', ""))
    for _ in range(5):
        assert https_get(port, "example.com") == "backend=a\n"
    assert steered(pin_path) == [5, 0]


def test_without_the_steering_program_the_relay_loads_and_the_hash_spreads(pin_path, monkeypatch):
    """A kernel whose verifier refuses bpf/steer.c (before 5.14 it has no sk_reuseport_md.sk)
    still gets the kernel relay: steering is skipped, said once, and nothing is attached."""
    import socket

    from sniproxy import bpfload
    from sniproxy.bpfsetup import BpfSetup
    from sniproxy import config

    real = bpfload._read_source
    monkeypatch.setattr(bpfload, "_read_source", lambda name: "int steer_connection(struct sk_reuseport_md *ctx)"
                        " { return ctx->no_such_field; }" if name == "steer" else real(name))
    cfg = config.load(text=f'[bpf]\nmode = "require"\npin_path = "{pin_path}"\n')
    setup = BpfSetup(cfg)
    setup.start()
    try:
        assert setup.relay_kind == "kernel"
        assert [s for s in setup.skipped if s.startswith("steering: bpf/steer.c: compiling failed")]
        assert not os.path.exists(f"{pin_path}/STEER_SLOTS") and os.path.exists(f"{pin_path}/SOCK_MAP")
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            setup.steer({(0, "127.0.0.1:%d" % sock.getsockname()[1]): sock})   # nothing to place: no error
        assert setup.steering is False and "steering: hash" in setup.describe()
    finally:
        setup.stop()
