"""The real master against real clients (Python ssl, curl, openssl) and real TLS backends.

These run with the userspace relay (bpf.mode = "off"); test_kernel_proxy.py runs
the same paths with the kernel relay.
"""
import ctypes
import json
import os
import re
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from netns import veth_netns
from harness import (MASTER, DelayedDns, Dnsmasq, LoopbackCapture, cpu_seconds, stream_through, curl, echo_over, echo_through, free_port, https_get, sha,
                     through_proxy, tls_client, wait_until)


def make_config(port, routes, *, fallback="", mode="off", extra="", protocol="tls", host="127.0.0.1",
                workers=2, pin_path=None, bpf="", policy=None, relay=""):
    """policy: relay.policy; by default "kernel" where BPF is on, so that a test of the kernel
    relay hands every pair to it (after bpf.handoff_*), and absent (auto) elsewhere. relay:
    more lines for the [relay] table."""
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    policy = policy or ("kernel" if mode != "off" else None)
    lines = [f"[master]\nworkers = {workers}\ngraceful_timeout = 10.0\n",
             *([f'[relay]\npolicy = "{policy}"\n{relay}'] if policy else []),
             f'[bpf]\nmode = "{mode}"\n' + (f'pin_path = "{pin_path}"\n' if pin_path else "") + bpf,
             f'[[listener]]\naddress = "{listen}"\nprotocol = "{protocol}"\nfallback = "{fallback}"\n']
    for match, backend, *keys in routes:   # more of the route's keys, as lines, after its backend
        lines.append(f'[[table.default]]\nmatch = \'{match}\'\nbackend = "{backend}"\n' +
                     "".join(f"{key}\n" for key in keys))
    return "\n".join(lines) + extra


def stats_json(p) -> dict:
    """All of `sniproxy-master stats --json`: the workers' counters and the BPF maps'."""
    out = p.cli("stats", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stats(p):
    return stats_json(p)["workers"]




def test_routes_exact_wildcard_regex_with_three_clients(proxy, backends):
    a, b, c = backends("exact", "wild", "regex")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address), ("*.wild.test", b.address),
                                 (r"~api[0-9]+\.test", c.address)]), wait_ports=(port,))
    assert https_get(port, "example.com") == "backend=exact\n"
    assert https_get(port, "EXAMPLE.com.") == "backend=exact\n"      # case and trailing dot
    assert https_get(port, "deep.sub.wild.test") == "backend=wild\n"
    assert curl(port, "api42.test").stdout == "backend=regex\n"
    assert curl(port, "x.wild.test", "--http1.1").stdout == "backend=wild\n"
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "api7.test",
                          "-quiet", "-ign_eof"], input=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                         capture_output=True, timeout=20)
    assert b"backend=regex" in out.stdout
    # The backend saw the client's own SNI: the proxy passed the handshake through.
    assert "api7.test" in c.sni
    assert (a.accepted, b.accepted, c.accepted) == (2, 2, 2)
    counters = stats(p)
    assert counters["relayed_userspace"] == 6
    assert counters["accepted"] == 6 + counters["closed_early"]   # the harness probes the port


def test_without_the_compiled_modules_the_proxy_routes_interpreted_and_says_so_once(proxy, backends, tmp_path):
    """The same sources, without what setup.py compiled: the master and its workers import
    firstflight.py and relay with the Python pairs, route as ever, and the master says once
    that both are interpreted."""
    import shutil
    import sniproxy
    tree = tmp_path / "tree"
    shutil.copytree(Path(sniproxy.__file__).parent, tree / "sniproxy", ignore=shutil.ignore_patterns("*.so", "*.c"))
    shutil.copytree(Path(sniproxy.__file__).parent.parent / "bpf", tree / "bpf")
    a = backends("a")
    port = free_port()
    # The tree's package alone: the editable install's finder would find the modules it lacks in the repo.
    run_from_tree = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                     "sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith('__editable__')]; "
                     "from sniproxy.cli import main; sys.exit(main())"]
    p = proxy(make_config(port, [("example.com", a.address)]), start=False)
    p.start(wait_ports=(port,), wrap=lambda argv: [*run_from_tree, *argv[len(MASTER):]])
    for _ in range(3):
        assert https_get(port, "example.com") == "backend=a\n"
    assert p.output().count("the first-flight parser and the copy and splice relays' pairs not compiled") == 1
    workers = p.worker_pids()
    assert workers
    for pid in workers:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "firstflight.cpython" not in maps and "copypair.cpython" not in maps


def test_unknown_name_gets_unrecognized_name_alert(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)]), wait_ports=(port,))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        https_get(port, "unknown.test")
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "nope.test"],
                         input=b"", capture_output=True, timeout=20)
    assert b"unrecognized name" in out.stdout + out.stderr
    assert a.accepted == 0
    assert stats(p)["refused_no_route"] == 2
    assert p.output().count("outcome=refused:no_route") == 2


def test_fallback_for_no_sni_and_for_non_tls(proxy, backends, plain):
    a = backends("a")
    fb = plain("fallback")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], fallback=fb.address), wait_ports=(port,))
    # iperf3-like: the first bytes are not a ClientHello; the fallback gets them unchanged.
    payload = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", port)) as s:
        threading.Thread(target=s.sendall, args=(payload,), daemon=True).start()
        got = bytearray()
        while len(got) < len(payload) and (chunk := s.recv(65536)):
            got += chunk
    assert sha(got) == sha(payload)
    assert fb.accepted == 1 and a.accepted == 0
    assert stats(p)["fallback"] == 1


def test_no_sni_without_fallback_is_refused(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)]), wait_ports=(port,))
    with pytest.raises(ssl.SSLError):
        https_get(port, None)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:    # not TLS at all
        s.sendall(b"hello there\r\n")
        assert s.recv(100) == b""
    counters = stats(p)
    assert counters["refused_no_name"] == 1 and counters["refused_not_protocol"] == 1
    assert a.accepted == 0


def test_malformed_and_slow_first_flight_never_reach_a_backend(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], fallback=a.address,
                          extra="[timeouts]\nclient_hello = 2.0\n"), wait_ports=(port,))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes.fromhex("160301000a") + b"\x02" + bytes(9))       # a ServerHello, not a ClientHello
        assert s.recv(100) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes.fromhex("160301000a") + b"\x02")                  # its type byte alone decides
        start = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - start < 1.0                            # at once, not at client_hello
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes.fromhex("1603010200"))                           # a record header, then silence
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 1.8 < time.monotonic() - start < 5
    counters = stats(p)
    assert counters["refused_malformed"] == 2 and counters["refused_client_hello_timeout"] == 1
    assert a.accepted == 0


def test_a_silent_client_is_accepted_only_after_a_second_and_then_timed_out(proxy, plain):
    """Listeners defer accept until the client's first bytes arrive (TCP_DEFER_ACCEPT): a
    talking client is served at once, while a silent one costs the workers nothing for
    the second the kernel waits, then is accepted and refused at timeouts.client_hello."""
    b = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, workers=1, extra="[timeouts]\nclient_hello = 0.5\n"),
              wait_ports=(port,))
    wait_until(lambda: stats(p)["closed_early"] >= 1, what="the harness's probe to end")
    accepted = stats(p)["accepted"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        connected = time.monotonic()
        time.sleep(0.6)
        assert stats(p)["accepted"] == accepted     # not handed to a worker yet
        with socket.create_connection(("127.0.0.1", port), timeout=10) as talking:
            talking.sendall(b"\x00talking")
            assert talking.recv(64) == b"\x00talking"
        assert silent.recv(64) == b""                # accepted after the retransmitted SYN-ACK, then timed out
        elapsed = time.monotonic() - connected
    assert 1.2 < elapsed < 6, elapsed
    counters = stats(p)
    assert (counters["accepted"], counters["refused_client_hello_timeout"]) == (accepted + 2, 1)


def test_the_first_flight_carries_the_handshake_ack_and_later_acks_go_at_once(proxy):
    """Toward the backend, the handshake's last ACK rides with the first flight (no bare ACK
    between the SYN and the data); after it, ACKs are not delayed: a backend's small write
    is ACKed at once, not 40 ms later (which would hold its next write behind Nagle).
    Times are the capture's kernel timestamps, so a busy machine does not move them."""
    backend = socket.create_server(("127.0.0.1", 0))
    backend_port = backend.getsockname()[1]
    port = free_port()
    proxy(make_config(port, [], fallback=f"127.0.0.1:{backend_port}", workers=1), wait_ports=(port,))
    with LoopbackCapture(backend_port) as capture, backend, \
            through_proxy(port, backend, b"\x00hello") as (client, conn):
        wait_until(lambda: len(toward(capture.segments(), backend_port)) >= 2, what="SYN and first flight")
        sent = toward(capture.segments(), backend_port)
        assert [("SYN" if s.flags & 2 else "ACK", len(s.payload)) for s in sent[:2]] == [("SYN", 0), ("ACK", 6)]
        conn.sendall(b"a")
        assert client.recv(1) == b"a"
        wait_until(lambda: len(toward(capture.segments(), backend_port)) >= 3, what="the ACK of the write")
        data = next(s for s in capture.segments() if s.sport == backend_port and s.payload == b"a")
        ack = toward(capture.segments(), backend_port)[2]
        assert (len(ack.payload), struct.unpack_from("!I", ack.header, 8)[0]) == (0, data.seq + 1)
        assert ack.at - data.at < 0.02, ack.at - data.at   # a delayed ACK takes 40 ms or more


def toward(segments, port):
    """The segments sent to port."""
    return [s for s in segments if s.dport == port]


def test_a_full_worker_leaves_new_connections_waiting(proxy, plain):
    """master.max_connections = 2: a third connection waits in the accept queue,
    neither served nor reset, and is served as soon as one of the two ends."""
    b = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, workers=1, extra="").replace(
        "workers = 1\n", "workers = 1\nmax_connections = 2\n"), wait_ports=(port,))
    wait_until(lambda: stats(p)["closed_early"] >= 1, what="the harness's probe to end")
    first, second = (socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2))
    for s in (first, second):
        s.sendall(b"\x00ping")
        assert s.recv(64) == b"\x00ping"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
        third.sendall(b"\x00waiting")
        third.settimeout(0.5)
        with pytest.raises(socket.timeout):        # queued: no answer, and no reset either
            third.recv(64)
        assert stats(p)["accepted"] == 3           # the probe and the two
        first.close()
        third.settimeout(5)
        assert third.recv(64) == b"\x00waiting"
    second.close()
    wait_until(lambda: stats(p)["relayed_userspace"] == 3, what="three relayed connections")


def test_out_of_descriptors_the_worker_backs_off_and_recovers(proxy, plain):
    """With its fd limit lowered to what it holds plus three, a worker accepts three
    stalled clients and then hits EMFILE: it waits without spinning (under 5% of a
    CPU), logs at most once a second, and serves the next client once fds free up."""
    b = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, workers=1, extra="[timeouts]\nclient_hello = 60.0\n"),
              wait_ports=(port,))
    wait_until(lambda: stats(p)["closed_early"] >= 1, what="the harness's probe to end")
    worker = p.worker_pids()[0]
    held = len(os.listdir(f"/proc/{worker}/fd"))
    soft, hard = (int(v) for v in subprocess.run(["prlimit", f"--pid={worker}", "--nofile", "--raw", "--noheadings",
                                                 "--output=SOFT,HARD"], capture_output=True, text=True,
                                                check=True).stdout.split())
    subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={held + 3}:{hard}"], check=True)
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for s in stalled:    # a record's first byte: accepted (TCP_DEFER_ACCEPT), then waiting for the rest
        s.sendall(b"\x16")
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client.sendall(b"\x00after the limit")
        wait_until(lambda: "Too many open files" in p.output(), what="EMFILE")
        logged, cpu = p.output().count("Too many open files"), cpu_seconds([worker])
        time.sleep(2.0)
        assert cpu_seconds([worker]) - cpu < 0.1                          # under 5% of a CPU
        assert p.output().count("Too many open files") - logged <= 3     # once a second at most
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):
            client.recv(64)
        subprocess.run(["prlimit", f"--pid={worker}", f"--nofile={soft}:{hard}"], check=True)
        client.settimeout(5)
        assert client.recv(64) == b"\x00after the limit"
    finally:
        for s in stalled + [client]:
            s.close()


def test_alpn_route_takes_acme_challenges(proxy, backends):
    """The same name, two routes: a hello offering acme-tls/1 reaches the responder,
    any other the web server (Python ssl as the client, real TLS backends)."""
    web, acme = backends("web", "acme")
    port = free_port()
    proxy(make_config(port, [("example.com", web.address)]).replace(
        "[[table.default]]", f'[[table.default]]\nmatch = "example.com"\nbackend = "{acme.address}"\n'
                             'alpn = ["acme-tls/1"]\n\n[[table.default]]', 1), wait_ports=(port,))

    assert https_get(port, "example.com", alpn=["acme-tls/1"]) == "backend=acme\n"
    assert https_get(port, "example.com", alpn=["h2", "http/1.1"]) == "backend=web\n"


@pytest.mark.parametrize("handoff", ["handoff_bytes = 65536\nhandoff_after = 0.05\n",
                                     "handoff_bytes = 0\nhandoff_after = 0.0\n"], ids=["after 64 KiB", "at once"])
def test_splice_policy_carries_every_byte_in_order(proxy, plain, tmp_path, handoff):
    """relay.policy = "splice": a server that speaks first, a client that streams right
    behind its first flight, both ways at once and across the handoff; every byte
    arrives in order (sha256), half-close is carried, and the log says relay=splice."""
    greeting = os.urandom(300_000)
    b = plain("early", greeting=greeting)
    port = free_port()
    access_log = tmp_path / "access.log"
    p = proxy(make_config(port, [], fallback=b.address, bpf=handoff,
                          extra=f'[relay]\npolicy = "splice"\n[log]\naccess = "{access_log}"\n'), wait_ports=(port,))
    for size in (10, 100_000, 8 << 20):
        payload = b"\x00" + os.urandom(size)
        got = stream_through(port, payload)
        assert sha(got) == sha(greeting + payload), size    # the echo backend's greeting, then the echo
    wait_until(lambda: access_log.read_text().count("outcome=done") >= 3, what="three log lines")
    relays = [line.split(" relay=")[1].split()[0] for line in access_log.read_text().splitlines() if "up=" in line
              and "outcome=done" in line]
    # At once, every connection is spliced. After 64 KiB, a client whose FIN came before the
    # handoff stays where it is (a half-closed pair is not handed on): the 8 MiB one never does.
    assert relays[-3:] == ["splice"] * 3 if "= 0\n" in handoff else relays[-1] == "splice", relays
    assert stats(p)["relayed_splice"] == relays.count("splice")


def test_http_listener_routes_by_host(proxy, plain):
    a, b = plain("a"), plain("b")
    port = free_port()
    p = proxy(make_config(port, [("a.test", a.address), ("*.b.test", b.address)], protocol="http"),
              wait_ports=(port,))

    def get(url, host):
        return subprocess.run(["curl", "-s", "-o", "-", "-w", "%{http_code}", "--max-time", "10",
                               "-H", f"Host: {host}", url], capture_output=True, text=True).stdout

    assert get(f"http://127.0.0.1:{port}/", "a.test") == "backend=a\n200"
    assert get(f"http://127.0.0.1:{port}/", "x.b.test:8080") == "backend=b\n200"
    # absolute-form request target, as sent to a forward proxy
    assert subprocess.run(["curl", "-s", "--max-time", "10", "-x", f"http://127.0.0.1:{port}", "http://a.test/"],
                          capture_output=True, text=True).stdout == "backend=a\n"
    assert get(f"http://127.0.0.1:{port}/", "nowhere.test") == "421"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:    # RFC 9112: HTTP/1.1 needs a Host
        s.sendall(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    counters = stats(p)
    assert counters["refused_no_route"] == 1 and counters["refused_malformed"] == 1
    assert (a.accepted, b.accepted) == (2, 1)


def test_fastopen_routes_send_the_first_flight_in_the_syn(proxy):
    """A route with fastopen = true connects with TCP Fast Open: after the first connection
    fetched the backend's cookie, each first flight rides the SYN. A route without it never does."""
    assert int(Path("/proc/sys/net/ipv4/tcp_fastopen").read_text()) & 1, "the client side of Fast Open is off"
    with veth_netns() as ns:
        backend = ns.fast_open_echo(ns.peer_v4s[0], 7000)
        try:
            port = free_port()
            address = f"{ns.peer_v4s[0]}:7000"
            closed = f"{ns.peer_v4s[0]}:7001"   # nothing listens: the SYN is answered with a reset
            p = proxy(make_config(port, [("fast.test", address, "fastopen = true"), ("plain.test", address),
                                         ("closed.test", closed, "fastopen = true")],
                                  protocol="http"), wait_ports=(port,))

            def get(host: str) -> bytes:
                request = f"GET /{host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(request)
                    answer = b""
                    while chunk := s.recv(4096):
                        answer += chunk
                assert answer == b"got " + request
                return answer

            for _ in range(3):
                get("plain.test")
            assert ns.tcp_counter("TCPFastOpenPassive") == 0
            for _ in range(6):
                get("fast.test")
            assert ns.tcp_counter("TCPFastOpenPassive") == 5   # the first asked for the cookie
            for _ in range(3):
                get("plain.test")
            assert ns.tcp_counter("TCPFastOpenPassive") == 5
            assert stats(p)["relayed_userspace"] == 12
            # A backend that refuses is found out before the relay begins, though the first flight
            # went in the SYN (the address's cookie is held by now): the client gets the refusal.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: closed.test\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert stats(p)["refused_connect_failed"] == 1
        finally:
            backend.kill()
            backend.wait()


def test_clients_waiting_on_one_slow_lookup_all_connect(proxy, backends, tmp_path):
    """Eight clients at once, a named backend, a cold cache and a resolver that takes
    0.3 s: they share one query and its answer, and each connects (connecting once
    consumed the shared address list, and seven of eight were refused)."""
    a = backends("named")
    dns = Dnsmasq(tmp_path, {"origin.test": "127.0.0.1"})
    slow = DelayedDns(dns.port, 0.3)
    try:
        port = free_port()
        extra = f'[resolver]\nnameservers = ["127.0.0.1:{slow.port}"]\n'
        p = proxy(make_config(port, [("example.com", f"origin.test:{a.port}")], extra=extra, workers=1),
                  wait_ports=(port,))
        answers = [None] * 8

        def get(i):
            answers[i] = https_get(port, "example.com")
        threads = [threading.Thread(target=get, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert answers == ["backend=named\n"] * 8
        assert dns.queries("origin.test") == 1
        assert stats(p)["refused_connect_failed"] == 0
    finally:
        slow.close()
        dns.close()


def test_star_backend_resolves_with_dnsmasq(proxy, backends, tmp_path):
    a = backends("resolved")
    dns = Dnsmasq(tmp_path, {"api.example.com": "127.0.0.1", "pub.example.com": "198.18.0.1"})
    try:
        port = free_port()
        extra = f'[resolver]\nnameservers = ["127.0.0.1:{dns.port}"]\nallow_private = true\n'
        proxy(make_config(port, [("*.example.com", f"*:{a.port}")], extra=extra, workers=1), wait_ports=(port,))
        for _ in range(3):
            assert https_get(port, "api.example.com") == "backend=resolved\n"
        assert dns.queries("api.example.com") == 1      # then the TTL cache answers
        port2 = free_port()
        extra2 = f'[resolver]\nnameservers = ["127.0.0.1:{dns.port}"]\n'
        p2 = proxy(make_config(port2, [("*.example.com", f"*:{a.port}")], extra=extra2, workers=1),
                   wait_ports=(port2,))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(port2, "api.example.com")          # loopback answer, allow_private = false
        assert stats(p2)["refused_private_address"] == 1
    finally:
        dns.close()


def test_large_transfer_both_directions_intact(proxy, backends):
    a = backends("echo")
    port = free_port()
    proxy(make_config(port, [("example.com", a.address)]), wait_ports=(port,))
    payload = os.urandom(32 << 20)
    assert sha(echo_through(port, "example.com", payload)) == sha(payload)


def test_half_close_is_carried(proxy, plain):
    fb = plain("echo")
    port = free_port()
    proxy(make_config(port, [], fallback=fb.address), wait_ports=(port,))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"not tls, half-closed after this")
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(4096):
            got += chunk
    assert got == b"not tls, half-closed after this"


def _borrowed_tcp_sockets(pid: int) -> list[socket.socket]:
    """Copies of every TCP socket the process holds (pidfd_getfd), to read their options."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd, found = os.pidfd_open(pid), []
    try:
        for entry in os.listdir(f"/proc/{pid}/fd"):
            if not os.readlink(f"/proc/{pid}/fd/{entry}").startswith("socket:"):
                continue
            fd = libc.syscall(438, pidfd, int(entry), 0)   # SYS_pidfd_getfd on x86_64
            assert fd >= 0, os.strerror(ctypes.get_errno())
            sock = socket.socket(fileno=fd)
            if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                found.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return found


def test_both_sockets_of_a_connection_have_nodelay(proxy, plain):
    """The client's socket takes TCP_NODELAY from the listening socket, the upstream's
    is set at connect: small writes are never held back by Nagle's algorithm."""
    fb = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=fb.address, workers=1), wait_ports=(port,))
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"not tls")
        assert s.recv(64) == b"not tls"      # relayed: both of the proxy's sockets exist
        sockets = _borrowed_tcp_sockets(p.worker_pids()[0])
        try:
            by_peer = {sock.getpeername(): sock for sock in sockets
                       if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
            client_side = by_peer[s.getsockname()]
            upstream_side = by_peer[("127.0.0.1", int(fb.address.rsplit(":", 1)[1]))]
            assert client_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert upstream_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            for sock in sockets:
                sock.close()


def test_ipv6_listener_and_backend(proxy, backends):
    a = backends("six", host="::1")
    port = free_port("::1")
    proxy(make_config(port, [("example.com", a.address)], host="::1"))
    wait_until(lambda: _connects("::1", port), what="the IPv6 listener")
    assert https_get(port, "example.com", host="::1") == "backend=six\n"


def _connects(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def test_dead_worker_loses_no_queued_connection(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], workers=1), wait_ports=(port,))
    [worker] = p.worker_pids()
    os.kill(worker, signal.SIGSTOP)                  # connections now wait in its accept queue
    results = []
    threads = [threading.Thread(target=lambda: results.append(https_get(port, "example.com"))) for _ in range(5)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(worker, signal.SIGKILL)
    for t in threads:
        t.join(30)
    assert results == ["backend=a\n"] * 5
    assert wait_until(lambda: p.worker_pids() and p.worker_pids() != [worker], what="a replacement worker")


def test_reload_under_traffic(proxy, backends):
    a, b = backends("a", "b")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)]), wait_ports=(port,))
    live = tls_client(port, "example.com")              # goes on across the reload
    live.sendall(b"before")
    assert live.recv(100) == b"before"
    p.write(make_config(port, [("example.com", b.address)]))
    assert p.cli("reload").returncode == 0
    wait_until(lambda: https_get(port, "example.com") == "backend=b\n", what="the new route")
    live.sendall(b"after")
    assert live.recv(100) == b"after"
    live.close()
    p.write("[master]\nworkers = 'many'\n")                # rejected; the running config stays
    p.signal(signal.SIGHUP)
    wait_until(lambda: "reload rejected" in p.output(), what="the rejection")
    assert all(https_get(port, "example.com") == "backend=b\n" for _ in range(4))


def test_reload_to_fewer_workers_strands_no_connection(proxy, backends):
    """A slot the reload removes leaves SO_REUSEPORT's group at once, although an old
    worker still drains a connection: a listening socket that lingered there, held by
    no one who accepts, would take its share of new connections and never answer."""
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], workers=2), wait_ports=(port,))
    old, live = p.worker_pids(), []
    try:
        # Both old workers keep draining: one holds the removed slot's socket as its own,
        # the other as a copy inherited from the master.
        while _serving_pids(port) != set(old) and len(live) < 32:
            live.append(tls_client(port, "example.com"))
            live[-1].sendall(b"before")
            assert live[-1].recv(100) == b"before"
        assert _serving_pids(port) == set(old)
        p.write(make_config(port, [("example.com", a.address)], workers=1))
        assert p.cli("reload").returncode == 0
        wait_until(lambda: len(set(p.worker_pids()) - set(old)) == 1, what="the new worker")
        # Connections spread over the group by their ports: 16 reach every member.
        assert [https_get(port, "example.com", timeout=3) for _ in range(16)] == ["backend=a\n"] * 16
        for s in live:
            s.sendall(b"after")
            assert s.recv(100) == b"after"
    finally:
        for s in live:
            s.close()


def _serving_pids(port: int) -> set[int]:
    """The processes holding connections accepted on port."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


@pytest.mark.parametrize("mode, policy", [("off", "auto"), pytest.param("require", "auto", marks=pytest.mark.bpf),
                                          pytest.param("require", "kernel", marks=pytest.mark.bpf)])
def test_graceful_stop_lets_a_transfer_finish(proxy, backends, request, mode, policy):
    """With BPF and relay.policy auto, the pair is in copy or splice when the stop comes, and
    stays there (a stop has no successor to hand it to); with kernel, the kernel relays it,
    and the master's copy of it must not end it before it ends."""
    a = backends("echo")
    port = free_port()
    pin_path = request.getfixturevalue("pin_path") if mode == "require" else None
    p = proxy(make_config(port, [("example.com", a.address)], mode=mode, pin_path=pin_path, policy=policy),
              wait_ports=(port,))
    payload = os.urandom(8 << 20)
    with tls_client(port, "example.com", timeout=30) as s:
        s.sendall(payload[:1 << 20])
        got = bytearray(s.recv(262144))                   # the transfer is under way
        p.signal(signal.SIGTERM)                          # stop while it is in flight
        time.sleep(0.3)
        got = echo_over(s, payload, sent=1 << 20, received=got)
    assert sha(got) == sha(payload)
    stopping = time.monotonic()
    assert p.proc.wait(20) == 0
    # Every worker stopped once its connections ended, none at graceful_timeout (10 s).
    assert time.monotonic() - stopping < 5


def test_workers_take_their_signals_once_booted(proxy, backends):
    """A booted worker has every signal the master handles unblocked again, with its own
    dispositions, not the master's it was forked with. That they stay blocked from fork
    until then is tested on a real spawn in test_master.py, where the child can look at
    its mask before it boots."""
    from sniproxy.worker import SIGNALS
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)]), wait_ports=(port,))

    def dispositions(pid: int) -> dict[str, set[int]]:
        """Of the signals a worker handles: which the pid blocks, ignores and catches."""
        with open(f"/proc/{pid}/status") as status:
            masks = {key: int(value, 16) for key, value in
                     (line.split(":") for line in status if line.startswith(("SigBlk:", "SigIgn:", "SigCgt:")))}
        return {key: {sig for sig in SIGNALS if mask & (1 << (sig - 1))} for key, mask in masks.items()}

    # The worker's: its own handlers for SIGTERM, SIGQUIT, SIGUSR1 and SIGUSR2 (leave for a
    # successor); SIGINT ignored (the terminal's ^C goes to the master); SIGHUP and SIGCHLD
    # back to their defaults. The master catches all seven.
    worker = {"SigBlk": set(), "SigIgn": {signal.SIGINT},
              "SigCgt": {signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}}
    assert dispositions(p.proc.pid) == {"SigBlk": set(), "SigIgn": set(), "SigCgt": set(SIGNALS)}
    pids = p.worker_pids()
    assert len(pids) == 2
    for pid in pids:   # a worker still booting has them blocked, with the master's handlers
        try:
            wait_until(lambda pid=pid: dispositions(pid) == worker, what=f"worker {pid} to take its signals")
        except TimeoutError:
            assert dispositions(pid) == worker
    assert p.stop() == 0


def test_cli_check_errors_and_port_in_use(tmp_path, proxy, backends):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[listener]]\naddress = "1.2.3.4:99999"\ntable = "nope"\n')
    out = subprocess.run([*MASTER, "check", "-c", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "listener[0].address = '1.2.3.4:99999'" in out.stderr
    assert "listener[0].table = 'nope'" in out.stderr
    a = backends("a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = proxy(make_config(port, [("example.com", a.address)]), start=False)
        out = p.cli("start", "--foreground")
    assert out.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in out.stderr
    help_text = subprocess.run([*MASTER, "--help"], capture_output=True, text=True).stdout
    assert "reload" in help_text and "graceful" in help_text


def _process_titles() -> list[str]:
    return subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()


def test_daemon_start_status_stop(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)]), start=False)
    out = p.cli("start")
    assert out.returncode == 0, out.stderr
    try:
        # `start` returns once every worker has booted: nothing to wait for here.
        status = p.cli("status")
        assert status.returncode == 0 and "relay userspace" in status.stdout, status.stdout
        assert "(booting)" not in status.stdout and re.search(r"workers 0:\d+, 1:\d+$", status.stdout.splitlines()[0])
        wanted = (f"sniproxy: master {p.path}", "sniproxy: worker 0", "sniproxy: worker 1")
        assert set(wanted) <= set(_process_titles())
        assert https_get(port, "example.com") == "backend=a\n"
        # `stats | head`: a reader that is gone gets no traceback.
        gone, write_end = os.pipe()
        os.close(gone)
        try:
            piped = subprocess.run([*MASTER, "stats", "-c", str(p.path)],
                                   stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30)
        finally:
            os.close(write_end)
        assert piped.returncode == 1 and piped.stderr == ""
    finally:
        assert p.cli("stop").returncode == 0
    assert p.cli("status").returncode == 3
    assert not _connects("127.0.0.1", port)


def test_stuck_worker_is_aborted_and_replaced(proxy, backends):
    a = backends("a")
    port = free_port()
    p = proxy(make_config(port, [("example.com", a.address)], workers=1,
                          extra="").replace("graceful_timeout = 10.0", "graceful_timeout = 10.0\nworker_timeout = 1.5"),
              wait_ports=(port,))
    [worker] = p.worker_pids()
    os.kill(worker, signal.SIGSTOP)                 # alive, but its heartbeat stops
    wait_until(lambda: p.worker_pids() and p.worker_pids() != [worker], timeout=15, what="a replacement")
    assert "missed its heartbeat" in p.output()
    assert https_get(port, "example.com") == "backend=a\n"


def test_access_log_file_is_reopened_on_usr1(proxy, backends, tmp_path):
    a = backends("a")
    port = free_port()
    log = tmp_path / "access.log"
    p = proxy(make_config(port, [("example.com", a.address)], workers=1, extra=f'[log]\naccess = "{log}"\n'),
              wait_ports=(port,))
    assert https_get(port, "example.com") == "backend=a\n"
    wait_until(lambda: log.exists() and "name=example.com" in log.read_text(), what="the access line")
    line = [l for l in log.read_text().splitlines() if "name=example.com" in l][0]
    for field in ("client=127.0.0.1:", f"listener=127.0.0.1:{port}", "alpn=http/1.1", f"backend={a.address}",
                  "relay=userspace", "outcome=done", "duration="):
        assert field in line
    log.rename(tmp_path / "access.log.1")
    p.signal(signal.SIGUSR1)
    wait_until(lambda: log.exists(), what="the reopened log")
    assert https_get(port, "example.com") == "backend=a\n"
    wait_until(lambda: "name=example.com" in log.read_text(), what="a line in the new file")


@pytest.mark.parametrize("mode", ["off", "require"])
def test_client_reset_ends_the_backend_connection(proxy, plain, pin_path, mode):
    """A client that resets must not leave the backend connection open until the idle timeout."""
    b = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, mode=mode, pin_path=pin_path), wait_ports=(port,))
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\x00ping")
    assert s.recv(10) == b"\x00ping"
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                                          # RST
    wait_until(lambda: "outcome=reset" in p.output(), timeout=5, what="the relay to end on the reset")


def connecting_to(port: int) -> bool:
    """Some socket on this host is in SYN_SENT towards 127.0.0.1:port (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        return any(fields[3] == "02" and fields[2] == f"0100007F:{port:04X}"
                   for fields in (line.split() for line in list(table)[1:]))


def test_first_flight_waits_for_a_backend_still_connecting(proxy):
    """The backend's accept queue is full when the proxy connects, so the proxy's SYN is
    dropped and retried about a second later. The first flight, sent right after
    connect(), meets a socket still connecting, waits, and arrives whole afterwards."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        listener.settimeout(10)
        backend_port = listener.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", backend_port))   # the queue holds one
        port = free_port()
        p = proxy(make_config(port, [], fallback=f"127.0.0.1:{backend_port}"), wait_ports=(port,))
        payload = b"\x00not tls" + os.urandom(200_000)
        got = []

        def backend():
            # The proxy's SYN found the queue full and was dropped; its retry comes later.
            wait_until(lambda: connecting_to(backend_port), what="the proxy's SYN to the full backend")
            listener.accept()[0].close()        # the filler: room for the retried SYN
            conn, _ = listener.accept()
            with conn:
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                got.append(bytes(data))
                conn.sendall(b"received %d bytes" % len(data))

        server = threading.Thread(target=backend)
        server.start()
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            answer = client.recv(64)
        server.join(timeout=10)
        filler.close()
    assert time.monotonic() - started > 0.8     # the connect took a SYN retry
    assert got == [payload]
    assert answer == b"received %d bytes" % len(payload)
    counters = stats(p)
    assert (counters["refused_connect_failed"], counters["errors"]) == (0, 0)


def test_the_master_raises_its_soft_file_limit_to_the_hard_one(proxy):
    """A service starts with a soft file limit of 1024 (systemd's default): too few for a
    proxy, whose connections take two fds each in a worker, and a kernel-relayed one two
    more in the master. The master raises it to the hard limit, and its workers inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    port = free_port()
    p = proxy(make_config(port, [], fallback="127.0.0.1:9"), wait_ports=(port,),
              wrap=lambda argv: ["prlimit", f"--nofile=1024:{hard}", *argv])
    for pid in (p.proc.pid, *p.worker_pids()):
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == \
            [[str(hard), str(hard)]], (pid, limits)
