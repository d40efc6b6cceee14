"""Prometheus metrics served by the real master: known traffic in, exact counts out."""
import importlib.metadata
import os
import signal
import socket
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import free_port, https_get, sha, wait_until
from test_proxy import make_config, stats

AT_ONCE = "handoff_bytes = 0\nhandoff_after = 0.0\n"     # pairs go to the kernel right after connect
MiB = 1 << 20


def scrape(port: int) -> dict:
    """{(sample name, ((label, value), ...)): value} of every sniproxy_ sample, each
    family checked to have its HELP text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("sniproxy_"):
            assert family.documentation, family.name
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


def metrics_config(mport: int) -> str:
    return f'\n[metrics]\naddress = "127.0.0.1:{mport}"\n'


def socket_holders(port: int, peer_port: int | None = None) -> set[int]:
    """Pids with an fd on the TCP socket listening on 127.0.0.1:port (or, given
    peer_port, on the one connected from there)."""
    state, peer = ("0A", 0) if peer_port is None else ("01", peer_port)
    inode = next(f[9] for f in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
                 if f[3] == state and int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == peer)
    holders = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:   # an fd may close while we look (the backends' threads)
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    holders.add(int(pid))
            except OSError:
                pass
    return holders


def test_counts_match_the_traffic_and_reloads_restarts_rebind(proxy, backends, plain):
    a, echo = backends("a"), plain("echo")
    port, port2, mport, mport2 = free_port(), free_port(), free_port(), free_port()
    config = make_config(port, [("example.com", a.address)]) + \
        f'[[listener]]\naddress = "127.0.0.1:{port2}"\nfallback = "{echo.address}"\n'
    p = proxy(config + metrics_config(mport), wait_ports=(port,))
    assert socket_holders(mport) == {p.proc.pid}          # no worker inherited the metrics socket
    for _ in range(3):
        assert https_get(port, "example.com") == "backend=a\n"
    for name in ("unknown.test", "other.test"):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            https_get(port, name)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:    # not TLS, no fallback
        s.sendall(b"hello there\r\n")
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port2), timeout=5) as s:   # the second listener's fallback
        s.sendall(b"\x00echo")
        assert s.recv(100) == b"\x00echo"

    m = wait_until(lambda: (m := scrape(mport)) and get(m, "sniproxy_live_connections") == 0
                   and get(m, "sniproxy_connections_total", outcome="refused", relay="none") == 3
                   and get(m, "sniproxy_connections_total", outcome="relayed", relay="userspace") == 4 and m,
                   what="the connections to end")
    ended = {(o, r): get(m, "sniproxy_connections_total", outcome=o, relay=r) for o, r in
             [("relayed", "kernel"), ("relayed", "userspace"), ("refused", "none"), ("closed_early", "none"),
              ("error", "none")]}
    assert ended[("relayed", "userspace")] == 4 and ended[("relayed", "kernel")] == 0
    assert ended[("error", "none")] == 0
    # Every accepted connection ended one way: the rest are the harness's port probes.
    assert get(m, "sniproxy_connections_accepted_total") == sum(ended.values()) == 7 + ended[("closed_early", "none")]
    by_listener = {(listener, result): get(m, "sniproxy_listener_connections_total", listener=listener, result=result)
                   for listener in (f"127.0.0.1:{port}", f"127.0.0.1:{port2}") for result in ("accepted", "relayed", "refused")}
    assert by_listener == {(f"127.0.0.1:{port}", "accepted"): 6 + ended[("closed_early", "none")],
                           (f"127.0.0.1:{port}", "relayed"): 3, (f"127.0.0.1:{port}", "refused"): 3,
                           (f"127.0.0.1:{port2}", "accepted"): 1, (f"127.0.0.1:{port2}", "relayed"): 1,
                           (f"127.0.0.1:{port2}", "refused"): 0}
    refusals = {labels[0][1]: v for (name, labels), v in m.items() if name == "sniproxy_refusals_total"}
    assert refusals.pop("no_route") == 2 and refusals.pop("not_protocol") == 1
    assert set(refusals.values()) == {0}
    # The same numbers `sniproxy-master stats` prints; no kernel relay, no kernel samples.
    counters = stats(p)
    assert get(m, "sniproxy_relayed_bytes_total", direction="up", relay="userspace") \
        == counters["bytes_up_userspace"] > 3 * 200
    assert get(m, "sniproxy_relayed_bytes_total", direction="down", relay="userspace") \
        == counters["bytes_down_userspace"] > 3 * 500
    assert not any(dict(labels).get("relay") == "kernel" for name, labels in m if name.startswith("sniproxy_relayed"))
    assert ("sniproxy_kernel_map_pairs", ()) not in m
    assert get(m, "sniproxy_workers") == 2 and get(m, "sniproxy_worker_restarts_total") == 0
    assert get(m, "sniproxy_kernel_maps_full_total") == get(m, "sniproxy_kernel_batched_total") == 0
    assert get(m, "sniproxy_build_info", version=importlib.metadata.version("sniproxy")) == 1
    assert get(m, "sniproxy_reloads_total", result="ok") == get(m, "sniproxy_reloads_total", result="rejected") == 0
    started = get(m, "sniproxy_last_reload_success_timestamp_seconds")

    # A reload that moves the metrics: the old port closes, the new one serves the same counts.
    p.write(config + metrics_config(mport2))
    p.signal(signal.SIGHUP)
    m = wait_until(lambda: _try_scrape(mport2), what="metrics on the new address")
    assert [get(m, "sniproxy_reloads_total", result=r) for r in ("ok", "rejected")] == [1, 0]
    assert get(m, "sniproxy_last_reload_success_timestamp_seconds") > started
    assert get(m, "sniproxy_connections_total", outcome="relayed", relay="userspace") == 4
    with pytest.raises(urllib.error.URLError):
        scrape(mport)
    wait_until(lambda: len(p.worker_pids()) == 2, what="the old workers to leave")
    assert socket_holders(mport2) == {p.proc.pid}
    reloaded = get(m, "sniproxy_last_reload_success_timestamp_seconds")

    # A rejected reload counts as such and leaves the timestamp alone.
    p.write(config + '\n[metrics]\naddress = "not an address"\n')
    p.signal(signal.SIGHUP)
    m = wait_until(lambda: (m := scrape(mport2)) and get(m, "sniproxy_reloads_total", result="rejected") == 1 and m,
                   what="the rejected reload")
    assert get(m, "sniproxy_reloads_total", result="ok") == 1
    assert get(m, "sniproxy_last_reload_success_timestamp_seconds") == reloaded

    # A worker killed is a restart; the old generation's exits were not.
    os.kill(p.worker_pids()[0], signal.SIGKILL)
    m = wait_until(lambda: (m := scrape(mport2)) and get(m, "sniproxy_worker_restarts_total") == 1
                   and get(m, "sniproxy_workers") == 2 and m, what="the worker to be replaced")
    assert https_get(port, "example.com") == "backend=a\n"


def _try_scrape(port: int) -> dict | None:
    try:
        return scrape(port)
    except urllib.error.URLError:
        return None


class Doubler:
    """A plain backend that reads until the client half-closes, then answers every byte
    twice and closes: twice as many bytes down as up."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        self.sock.close()   # one connection is all it serves
        with conn:
            data = _recv(conn, 1 << 30)
            conn.sendall(data + data)


@pytest.mark.bpf
def test_kernel_bytes_and_pairs(proxy, backends, pin_path):
    a = backends("a")
    doubler = Doubler()
    port, mport = free_port(), free_port()
    p = proxy(make_config(port, [("example.com", a.address)], fallback=doubler.address, mode="require",
                          pin_path=pin_path, bpf=AT_ONCE) + metrics_config(mport), wait_ports=(port,))
    m = scrape(mport)
    assert get(m, "sniproxy_kernel_map_pairs") == 0
    assert {dict(labels)["result"] for name, labels in m if name == "sniproxy_xdp_packets_total"} \
        == {"passed", "dropped_deny", "dropped_not_allowed"}
    first, payload = b"\x00not tls", os.urandom(MiB)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(first)
        # The pair is in the kernel: the kernel's maps and the worker both say so.
        wait_until(lambda: (m := scrape(mport)) and get(m, "sniproxy_kernel_map_pairs") == 1
                   and get(m, "sniproxy_live_kernel_pairs") == 1, what="one pair in the kernel")
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert sha(_recv(s, 1 << 30)) == sha(2 * (first + payload))
    m = wait_until(lambda: (m := scrape(mport)) and get(m, "sniproxy_kernel_map_pairs") == 0
                   and get(m, "sniproxy_live_kernel_pairs") == 0 and get(m, "sniproxy_live_connections") == 0
                   and get(m, "sniproxy_connections_total", outcome="relayed", relay="kernel") == 1 and m,
                   what="the pair to end and leave the maps")
    assert get(m, "sniproxy_connections_total", outcome="relayed", relay="userspace") == 0
    assert get(m, "sniproxy_fallback_connections_total") == 1
    # The verdict carried the payload both ways; with what userspace moved, every byte once.
    up, down = ({relay: get(m, "sniproxy_relayed_bytes_total", direction=d, relay=relay)
                 for relay in ("kernel", "userspace")} for d in ("up", "down"))
    assert up["kernel"] >= len(payload) and down["kernel"] >= 2 * len(payload)
    assert (sum(up.values()), sum(down.values())) == (len(first + payload), 2 * len(first + payload))
    assert get(m, "sniproxy_kernel_maps_full_total") == get(m, "sniproxy_kernel_batched_total") == 0
    assert ("sniproxy_kernel_redirect_failures_total", ()) in m
    assert m[("sniproxy_kernel_trim_failures_total", ())] == 0
    # One registration, in the histogram's +Inf bucket and in exactly one finite bucket and up.
    assert get(m, "sniproxy_kernel_registration_seconds_count") == 1
    assert get(m, "sniproxy_kernel_registration_seconds_bucket", le="+Inf") == 1
    assert 0 < get(m, "sniproxy_kernel_registration_seconds_sum") < 1
    assert get(m, "sniproxy_relays_cut_total", reason="idle_timeout") == 0
    assert stats(p)["relayed_kernel"] == 1


def _recv(s: socket.socket, n: int) -> bytes:
    """Up to n bytes, fewer at EOF."""
    data = bytearray()
    while len(data) < n and (chunk := s.recv(min(n - len(data), 262144))):
        data += chunk
    return bytes(data)


def test_a_taken_metrics_port_only_warns_and_a_reload_retries(proxy, backends):
    a = backends("a")
    port, mport = free_port(), free_port()
    squatter = socket.create_server(("127.0.0.1", mport))
    try:
        p = proxy(make_config(port, [("example.com", a.address)]) + metrics_config(mport), wait_ports=(port,))
        assert https_get(port, "example.com") == "backend=a\n"
        assert p.output().count(f"metrics: cannot listen on 127.0.0.1:{mport}") == 1
        assert socket_holders(mport) == {os.getpid()}
    finally:
        squatter.close()
    p.signal(signal.SIGHUP)
    m = wait_until(lambda: _try_scrape(mport), what="metrics once the port is free")
    assert get(m, "sniproxy_connections_total", outcome="relayed", relay="userspace") == 1
    assert https_get(port, "example.com") == "backend=a\n"


def test_a_scrape_in_flight_when_the_master_forks_stays_out_of_the_workers(proxy, backends):
    a = backends("a")
    port, mport = free_port(), free_port()
    p = proxy(make_config(port, [("example.com", a.address)]) + metrics_config(mport), wait_ports=(port,))
    with socket.create_connection(("127.0.0.1", mport), timeout=5) as held:
        held.sendall(b"GET /metrics HTTP/1.1\r\n")     # the rest never comes: its thread waits
        mine = held.getsockname()[1]
        wait_until(lambda: socket_holders(mport, mine) == {p.proc.pid}, what="the master to take the scrape")
        p.signal(signal.SIGHUP)                          # forks two new workers meanwhile
        wait_until(lambda: sum(w["generation"] == 1 for w in p.state()["workers"]) == 2, what="new workers")
        assert socket_holders(mport, mine) == {p.proc.pid}
        held.sendall(b"\r\n")
        assert b"sniproxy_connections_accepted_total" in _recv(held, 1 << 20)
