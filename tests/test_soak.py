"""A bounded soak: a minute of mixed traffic through both relays, with worker kills and
reloads, then nothing left behind."""
import os
import random
import signal
import socket
import ssl
import threading
import time

import pytest

from harness import free_port, https_get, sha, wait_until
from test_kernel_proxy import _echo, _rss_kib, entries
from test_proxy import stats_json

pytestmark = pytest.mark.bpf
FAULTS = {5: "kill", 11: "reload", 17: "kill", 23: "reload", 29: "kill", 33: "reload"}
MEASURED = (38, 60)   # seconds of traffic, with no fault, between two idle snapshots of the same workers


def _config(port, echo_port, backend, echo, pin_path):
    return (f'[master]\nworkers = 2\ngraceful_timeout = 10.0\n'
            f'[bpf]\nmode = "require"\npin_path = "{pin_path}"\nhandoff_bytes = 65536\nhandoff_after = 0.1\n'
            f'[relay]\npolicy = "kernel"\n'
            f'[timeouts]\nclient_hello = 2.0\n'
            f'[[listener]]\naddress = "127.0.0.1:{port}"\n'
            f'[[listener]]\naddress = "127.0.0.1:{echo_port}"\ntable = "none"\nfallback = "{echo.address}"\n'
            f'[[table.default]]\nmatch = "example.com"\nbackend = "{backend.address}"\n'
            f'[[table.none]]\nmatch = "nothing.test"\nbackend = "{backend.address}"\n')


def _snapshot(pid):
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "rss_kib": _rss_kib(pid)}


def test_a_minute_of_mixed_traffic_with_faults_leaves_nothing_behind(proxy, backends, plain, pin_path):
    a = backends("a")
    echo = plain("echo")
    port, echo_port = free_port(), free_port()
    p = proxy(_config(port, echo_port, a, echo, pin_path), wait_ports=(port, echo_port))
    stop, lock = threading.Event(), threading.Lock()
    tallies = {"faults": {}, "calm": {}}   # the first part, with kills and reloads; the last, with none
    tally = tallies["faults"]

    def count(what):
        with lock:
            tally[what] = tally.get(what, 0) + 1

    def one(rng):
        kind = rng.choice(["routed", "refused", "garbage", "transfer", "transfer", "idle"])
        try:
            if kind == "routed":
                assert https_get(port, "example.com", timeout=10) == "backend=a\n"
            elif kind == "refused":
                with pytest.raises((ssl.SSLError, OSError)):
                    https_get(port, "unknown.test", timeout=10)
            elif kind == "garbage":
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(os.urandom(64))
                    assert s.recv(100) == b""
            else:
                with socket.create_connection(("127.0.0.1", echo_port), timeout=15) as s:
                    payload = b"\x00" + os.urandom(rng.randint(1, 4 << 20) if kind == "transfer" else 64)
                    got = _echo(s, payload)
                    if kind == "idle":
                        time.sleep(rng.uniform(0.5, 3.0))
                        got += _echo(s, b"\x00again")
                        payload += b"\x00again"
                    if sha(got) != sha(payload):
                        return count(f"{kind}_broken" if len(got) < len(payload) else f"{kind}_corrupt")
            count(kind)
        except (OSError, AssertionError, pytest.fail.Exception):
            count(f"{kind}_failed")   # connections of a killed worker: reset or cut short

    def client(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            one(rng)

    def run_clients(until: float) -> None:
        stop.clear()
        threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(8)]
        for t in threads:
            t.start()
        while faults and started + faults[0][0] < until:
            at, fault = faults.pop(0)
            time.sleep(max(0.0, started + at - time.monotonic()))
            if fault == "kill":
                os.kill(random.choice(p.worker_pids()), signal.SIGKILL)
            else:
                p.signal(signal.SIGHUP)
        time.sleep(max(0.0, until - time.monotonic()))
        stop.set()
        for t in threads:
            t.join(30)

    def idle_state() -> dict:
        """Once every connection ended and every old worker left: per worker, its fds, RSS
        and gauges (watchers, kernel pairs); the maps must be empty by then."""
        wait_until(lambda: len(p.worker_pids()) == 2 and
                   all(v["live_connections"] == 0 for v in stats_json(p)["live"].values()), timeout=30,
                   what="every connection to end and the drained workers to exit")
        for name in ("SOCK_MAP", "CONNECTION_MAP", "RELAY_CONTROL"):
            wait_until(lambda: entries(pin_path, name) == 0, timeout=15, what=f"{name} to empty")
        time.sleep(2.5)   # the gauges' next second, and the idle sweep's last pass
        return {pid: {**_snapshot(pid), **stats_json(p)["live"][str(pid)]} for pid in p.worker_pids()}

    faults = sorted(FAULTS.items())
    started = time.monotonic()
    run_clients(started + MEASURED[0])    # the faults, then calm
    before = idle_state()
    tally = tallies["calm"]
    run_clients(started + MEASURED[1])
    after = idle_state()
    print(f"soak tallies: {tallies}\nidle workers before the last {MEASURED[1] - MEASURED[0]} s: {before}\nafter: {after}")
    # Intact or cut short, never altered. (A stretch repeated once in a few thousand
    # transfers until the verdict cut retransmitted bytes it had already relayed.)
    assert not any(k.endswith("_corrupt") for t in tallies.values() for k in t), tallies
    # A killed worker's connections end early (a FIN for an idle one); with no fault, none may.
    assert all("_" not in k for k in tallies["calm"]), tallies
    assert sum(v for t in tallies.values() for k, v in t.items() if "_" not in k) >= 500, tallies
    assert set(after) == set(before), "a worker died in the calm part"
    for pid, now in after.items():
        was = before[pid]
        assert (now["fds"], now["loop_watchers"], now["live_kernel_pairs"]) == \
            (was["fds"], was["loop_watchers"], 0), (pid, was, now)
        assert now["rss_kib"] <= 1.1 * was["rss_kib"], (pid, was, now)
    counters = stats_json(p)["workers"]
    assert counters["errors"] == 0 and counters["relayed_kernel"] > 0 and counters["relayed_userspace"] > 0, counters
