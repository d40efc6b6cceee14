"""The kernel (sockmap) relay on loopback: client <-> [c | u] <-> server.

Endpoints run in threads with plain blocking sockets; the relay runs in this
process's gevent hub, as in a worker. (bench/relay_loop measures its throughput
and CPU against a userspace loop and a direct connection.)
"""
import hashlib
import os
import random
import socket
import struct
import time

import gevent
import pytest

from bpf_fixtures import relay_pins  # noqa: F401 - fixtures
from harness import MiB, Background, LoopbackCapture, Segment, recv_stream, run_relay, send_stream, sha, tcp_pair
from sniproxy import keeper, kernel_relay
from sniproxy.bpfsys import PinnedMap
from sniproxy.counters import CounterTable
from sniproxy.kernel_abi import DIRECTION_DOWN, DIRECTION_UP, PERCPU_COUNTERS, RELAY_STATS, Connection
from sniproxy.kernel_pair import StowedPair
from sniproxy.kernel_relay import KernelRelay
from sniproxy.relay import STOWED, Chain, Handoff, Limits
from sniproxy.stats import percpu_totals
from sniproxy.userspace_relay import UserspaceRelay


pytestmark = pytest.mark.bpf


def cookie(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, 57, 8)


def send_stream_bytes(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(MiB):
        chunks.append(data)
    return b"".join(chunks)


@pytest.fixture
def relay(relay_pins):
    r = KernelRelay(relay_pins.pin_path)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def chained(relay):
    """The kernel relay as a worker runs it: behind the userspace relay, which hands
    every pair over at once and takes back the pairs that the kernel declines."""
    return Chain.of(UserspaceRelay(), relay, Handoff(0, 0))


def map_sizes_of(pins: str) -> dict[str, int]:
    sizes = {}
    for name in ("SOCK_MAP", "SOCK_TARGETS", "CONNECTION_MAP"):
        with PinnedMap.open(f"{pins}/{name}") as m:
            sizes[name] = len(m)
    return sizes


def test_bulk_both_directions_at_once(relay_pins, relay):
    size = 64 * MiB
    client, c = tcp_pair()
    u, server = tcp_pair()
    pair_cookies = {cookie(c), cookie(u)}
    seen_in_sock_map = []

    def watch_sock_map():
        with PinnedMap.open(f"{relay_pins.pin_path}/SOCK_MAP") as sock_map:
            while not seen_in_sock_map:
                keys = set(sock_map.keys())
                if keys:
                    seen_in_sock_map.append(keys)
                gevent.sleep(0.0005)

    watcher = gevent.spawn(watch_sock_map)
    jobs = [Background(send_stream, client, size, 1), Background(recv_stream, server),
            Background(send_stream, server, size, 2), Background(recv_stream, client)]
    result = run_relay(relay, c, u, idle=30)
    c.close(), u.close()
    up_sent, up_got, down_sent, down_got = (job.join() for job in jobs)
    watcher.kill()

    assert result[:4] == (size, size, "done", "kernel")
    assert 0 < result.kernel_up <= size and 0 < result.kernel_down <= size  # some went early, in userspace
    assert up_got == (size, up_sent) and down_got == (size, down_sent)
    assert seen_in_sock_map == [pair_cookies]
    assert map_sizes_of(relay_pins.pin_path) == {"SOCK_MAP": 0, "SOCK_TARGETS": 0, "CONNECTION_MAP": 0}
    # 128 MiB is tens of thousands of skbs; only hang-ups may wake the watcher.
    assert relay.wakeups <= 8
    for s in (client, server):
        s.close()


def test_pair_is_in_sock_map_during_transfer(relay_pins, relay):
    client, c = tcp_pair()
    u, server = tcp_pair()
    expected = {cookie(c), cookie(u)}
    relayer = gevent.spawn(run_relay, relay, c, u, 30)
    gevent.sleep(0.05)
    with PinnedMap.open(f"{relay_pins.pin_path}/SOCK_MAP") as sock_map:
        assert set(sock_map.keys()) == expected
        assert {sock_map.lookup(k) for k in expected} == expected  # value: the socket's cookie
    with PinnedMap.open(f"{relay_pins.pin_path}/CONNECTION_MAP") as connections:
        entries = {k: Connection.unpack(connections.lookup(k)) for k in expected}
    assert {k: (e.peer.to_bytes(8, "little"), e.direction) for k, e in entries.items()} == {
        cookie(c): (cookie(u), DIRECTION_UP), cookie(u): (cookie(c), DIRECTION_DOWN)}
    client.sendall(b"ping")
    assert server.recv(10) == b"ping"
    server.sendall(b"pong")
    assert client.recv(10) == b"pong"
    client.shutdown(socket.SHUT_WR), server.shutdown(socket.SHUT_WR)
    assert relayer.get(timeout=10) == (4, 4, "done", "kernel", 4, 4)
    assert map_sizes_of(relay_pins.pin_path)["CONNECTION_MAP"] == 0
    for s in (client, c, u, server):
        s.close()
    # A finished pair leaves the sockmaps as its sockets close.
    assert map_sizes_of(relay_pins.pin_path) == {"SOCK_MAP": 0, "SOCK_TARGETS": 0, "CONNECTION_MAP": 0}


def relay_stats(pins: str) -> dict[str, int]:
    """RELAY_STATS summed over the CPUs."""
    return percpu_totals(f"{pins}/{RELAY_STATS}", PERCPU_COUNTERS[RELAY_STATS])


def wait_for_sock_map(pins: str, count: int) -> None:
    with PinnedMap.open(f"{pins}/SOCK_MAP") as sock_map:
        with gevent.Timeout(10):
            while len(sock_map) < count:
                gevent.sleep(0.001)


def test_relay_stats_count_each_direction_exactly(relay_pins, relay):
    """Bytes sent after registration all pass the verdict: the per-direction
    counters equal what each side sent, and the total is their sum."""
    up_size, down_size = 3 * MiB + 17, 11 * MiB + 5
    client, c = tcp_pair()
    u, server = tcp_pair()
    relayer = gevent.spawn(run_relay, relay, c, u, 30)
    wait_for_sock_map(relay_pins.pin_path, 2)
    jobs = [Background(send_stream, client, up_size, 11), Background(recv_stream, server),
            Background(send_stream, server, down_size, 12), Background(recv_stream, client)]
    result = relayer.get(timeout=60)
    up_sent, up_got, down_sent, down_got = (job.join() for job in jobs)
    assert result == (up_size, down_size, "done", "kernel", up_size, down_size)
    assert up_got == (up_size, up_sent) and down_got == (down_size, down_sent)
    stats = relay_stats(relay_pins.pin_path)
    assert relay.pauses == 0
    assert (stats["up_bytes"], stats["down_bytes"]) == (up_size, down_size)
    assert stats["relayed_bytes"] == up_size + down_size
    assert stats["redirect_failures"] == 0
    assert 0 < stats["relayed_skbs"] <= up_size + down_size
    for s in (client, c, u, server):
        s.close()


def test_early_data_both_ways_for_hundreds_of_rounds(chained):
    """The client sends right behind its first flight, the server speaks at accept,
    and more bytes come during registration; every round must arrive intact."""
    rng = random.Random(7)
    proxy_listener = socket.create_server(("127.0.0.1", 0))
    server_listener = socket.create_server(("127.0.0.1", 0))

    def client_side(first, early, late, pause, expected):
        with socket.create_connection(proxy_listener.getsockname()) as s:
            s.sendall(first + early)
            time.sleep(pause)
            s.sendall(late)
            s.shutdown(socket.SHUT_WR)
            return recv_all(s) == expected

    def server_side(greeting, reply, expected):
        s, _ = server_listener.accept()
        with s:
            s.sendall(greeting)
            got = recv_all(s)
            s.sendall(reply)
            return got == expected

    try:
        for round_ in range(300):
            first = rng.randbytes(rng.randint(200, 600))
            early, late = rng.randbytes(rng.randint(1, 200_000)), rng.randbytes(rng.randint(0, 50_000))
            greeting, reply = rng.randbytes(rng.randint(1, 100_000)), rng.randbytes(rng.randint(0, 50_000))
            pause = rng.choice((0, 0, 0.0005, 0.002))
            client = Background(client_side, first, early, late, pause, greeting + reply)
            server = Background(server_side, greeting, reply, first + early + late)
            c, _ = proxy_listener.accept()
            with c:
                # Read exactly the first flight, as a worker does: it may end inside an skb.
                got = b""
                while len(got) < len(first):
                    got += c.recv(len(first) - len(got))
                with socket.create_connection(server_listener.getsockname()) as u:
                    u.sendall(got)
                    result = run_relay(chained, c, u, idle=10)
            # (A round whose FIN arrived before registration is relayed in userspace.)
            assert result[:3] == (len(early) + len(late), len(greeting) + len(reply), "done"), round_
            assert client.join() and server.join(), round_
    finally:
        proxy_listener.close(), server_listener.close()


@pytest.mark.parametrize("first_to_close", ["client", "server"])
def test_half_close_is_carried_both_ways(relay, first_to_close):
    """One side stops writing; the other still sends, and receives everything."""
    client, c = tcp_pair()
    u, server = tcp_pair()
    closer, other = (client, server) if first_to_close == "client" else (server, client)

    def closer_side():
        sent = send_stream(closer, 3 * MiB, 3)     # then SHUT_WR
        return sent, recv_stream(closer)            # still reading

    def other_side():
        got = recv_stream(other)                    # until the carried FIN
        return got, send_stream(other, 12 * MiB, 4)

    a, b = Background(closer_side), Background(other_side)
    result = run_relay(relay, c, u, idle=30)
    (closer_sent, closer_got), (other_got, other_sent) = a.join(), b.join()
    assert result.outcome == "done"
    assert other_got == (3 * MiB, closer_sent)
    assert closer_got == (12 * MiB, other_sent)
    for s in (client, c, u, server):
        s.close()


def test_slow_reader_is_bounded_without_losing_bytes(relay_pins):
    """A fast server and a client that reads slowly: the kernel must not queue
    without limit. The relay pauses the server's direction (TCP backpressure)
    and resumes it; every byte arrives in order."""
    max_queued, size = 4 * MiB, 48 * MiB
    relay = KernelRelay(relay_pins.pin_path, max_queued=max_queued, sndbuf=MiB)
    client, c = tcp_pair()
    u, server = tcp_pair()
    client_read = [0]
    peak = [0]

    def slow_reader():
        digest = hashlib.sha256()
        while data := client.recv(256 * 1024):
            digest.update(data)
            client_read[0] += len(data)
            time.sleep(0.005)
        return client_read[0], digest.hexdigest()

    def watch_kernel_queue():
        # Redirected toward the client (kernel counter) minus what it has read.
        key = cookie(u)
        with PinnedMap.open(f"{relay_pins.pin_path}/CONNECTION_MAP") as connections:
            while True:
                raw = connections.lookup(key)
                if raw:
                    peak[0] = max(peak[0], Connection.unpack(raw).bytes - client_read[0])
                gevent.sleep(0.002)

    # A download: the client only reads (its FIN comes once the relay runs;
    # a socket that got its FIN first cannot enter a sockmap).
    gevent.spawn_later(0.1, client.shutdown, socket.SHUT_WR)
    reader, sender = Background(slow_reader), Background(send_stream, server, size, 5)
    watcher = gevent.spawn(watch_kernel_queue)
    try:
        result = run_relay(relay, c, u, idle=30)
        pauses = relay.pauses
    finally:
        watcher.kill()
        relay.close()
    c.close(), u.close()
    print(f"peak kernel queue {peak[0] / MiB:.1f} MiB, {pauses} pauses")
    assert result.outcome == "done" and result.down == size
    assert reader.join() == (size, sender.join())
    assert pauses >= 1
    client_rcvbuf = int(open("/proc/sys/net/ipv4/tcp_rmem").read().split()[2])
    # Unbounded, this reaches about 40 MiB. Bounded: the limit, the client's own
    # receive and send buffers, and what one check interval lets through on a
    # loaded machine.
    assert peak[0] <= max_queued + client_rcvbuf + MiB + 8 * MiB, peak[0]
    for s in (client, server):
        s.close()


def test_idle_timeout(relay):
    client, c = tcp_pair()
    u, server = tcp_pair()
    client.sendall(b"hello")
    started = time.monotonic()
    result = run_relay(relay, c, u, idle=0.3)
    assert result == (5, 0, "idle_timeout", "kernel", 0, 0)  # the 5 bytes went early, in userspace
    assert 0.3 <= time.monotonic() - started < 2.5
    assert server.recv(10) == b"hello"
    for s in (client, c, u, server):
        s.close()


def test_quiet_pair_handed_off_by_age_is_checked_at_an_idle_pace(relay_pins):
    """A pair that moved nothing before its handoff is checked like an idle pair from the
    start (about once a second), not from the 2 ms of a busy one: thousands of them at
    once would otherwise keep a worker busy and its registrations behind."""
    kernel = KernelRelay(relay_pins.pin_path)
    relay = Chain.of(UserspaceRelay(), kernel, Handoff(64 << 10, 0.05))
    client, c = tcp_pair()
    u, server = tcp_pair()
    try:
        started = time.monotonic()
        result = run_relay(relay, c, u, idle=1.5)
        assert (result.outcome, result.kind) == ("idle_timeout", "kernel")
        assert 1.5 <= time.monotonic() - started < 3.5
        # 1 s, then the idle limit. A busy pair's pacing (2, 4, 8, ... ms) takes 10 checks.
        assert kernel.checks <= 3, kernel.checks
    finally:
        relay.close()
        for s in (client, c, u, server):
            s.close()


@pytest.mark.parametrize("batch_from", [1, kernel_relay.SWEEP_BATCH_FROM], ids=["batch read", "lookups"])
def test_idle_pairs_are_watched_by_one_sweep(relay, monkeypatch, batch_from):
    """A pair quiet for a second or two stops checking itself: one sweep a second (a batch
    read of CONNECTION_MAP once idle pairs are many, here an entry per loop turn) watches
    every idle pair, and wakes one whose entries changed. Each round: a message both ways,
    then idleness, then a burst the sweep must notice."""
    monkeypatch.setattr(kernel_relay, "SWEEP_BATCH_FROM", batch_from)
    monkeypatch.setattr(kernel_relay, "SWEEP_CHUNK", 1)
    parks = []
    relay.on_park = lambda: parks.append(time.monotonic())
    client, c = tcp_pair()
    u, server = tcp_pair()
    relayer = gevent.spawn(run_relay, relay, c, u, 30)
    gevent.sleep(0.05)
    for round_number in range(2):
        message = b"round %d" % round_number
        client.sendall(message)
        assert server.recv(64) == message
        server.sendall(message)
        assert client.recv(64) == message
        with gevent.Timeout(5):            # quiet long enough to join the sweep (1-2 s; later
            while len(parks) < round_number + 1:   # on a loaded machine) and park
                gevent.sleep(0.01)
        checks, sweeps = relay.checks, relay.sweeps
        gevent.sleep(2.1)
        assert relay.checks == checks, f"round {round_number}: the idle pair checked itself"
        assert relay.sweeps - sweeps >= 2
        assert len(parks) == round_number + 1   # it let its greenlet go, and the sweep resumed it
        client.sendall(b"burst")
        assert server.recv(64) == b"burst"
        with gevent.Timeout(1.5):          # the next sweep sees the changed entry
            while relay.checks == checks:
                gevent.sleep(0.01)
    client.shutdown(socket.SHUT_WR), server.shutdown(socket.SHUT_WR)
    assert relayer.get(timeout=10) == (24, 14, "done", "kernel", 24, 14)
    assert not relay._idle and not relay._sweeper.active   # the sweep stops with its last pair
    for s in (client, c, u, server):
        s.close()


def test_a_pair_handed_over_quiet_parks_at_its_first_check(relay_pins):
    """Handed over quiet, with its idle limit far off, a pair parks at its first check (its
    greenlet lives for the registration and one check); the sweep then carries it on a
    burst, and it ends with both FINs."""
    kernel = KernelRelay(relay_pins.pin_path)
    parks = []
    kernel.on_park = lambda: parks.append(time.monotonic())
    relay = Chain.of(UserspaceRelay(), kernel, Handoff(64 << 10, 0.05))
    (client, c), (u, server) = tcp_pair(), tcp_pair()
    try:
        done = []
        started = time.monotonic()
        relay.start(c, u, Limits(60.0), done.append)
        with gevent.Timeout(3):
            while not parks:
                gevent.sleep(0.01)
        assert kernel.checks == 1 and parks[0] - started < 0.5
        client.sendall(b"burst")
        assert server.recv(64) == b"burst"
        server.sendall(b"reply")
        assert client.recv(64) == b"reply"
        client.shutdown(socket.SHUT_WR), server.shutdown(socket.SHUT_WR)
        with gevent.Timeout(5):
            while not done:
                gevent.sleep(0.01)
        assert (done[0].up, done[0].down, done[0].outcome, done[0].kind) == (5, 5, "done", "kernel")
    finally:
        relay.close()
        for s in (client, c, u, server):
            s.close()


def test_a_kept_idle_pair_is_stowed_and_its_owner_let_go(relay_pins):
    """With the master keeping its pairs (a real keeper channel), a pair handed over quiet
    parks stowed: its owner hears STOWED, and the relay holds it alone, as the master does
    (fds and packed state, no Pair, no socket object). A burst wakes it rebuilt; it relays
    both ways, and its end goes to ends_kept with its record and every byte."""
    master_end, worker_end = keeper.channel()
    kernel = KernelRelay(relay_pins.pin_path, keeper=keeper.Link(worker_end, gevent.get_hub().loop))
    ended = []
    kernel.ends_kept = lambda record, result: ended.append((record, result))
    relay = Chain.of(UserspaceRelay(), kernel, Handoff(64 << 10, 0.05))
    (client, c), (u, server) = tcp_pair(), tcp_pair()
    kept_fds = []
    try:
        owner = []
        relay.start(c, u, Limits(60.0), owner.append, record={"client": "198.18.0.1:1", "up": 7})
        with gevent.Timeout(3):
            while not owner:
                gevent.sleep(0.01)
        assert [r.outcome for r in owner] == [STOWED] and (kernel.unowned, kernel.kept) == (1, 0)
        assert [type(p) for p in kernel._pairs_by_fd.values()] == [StowedPair] * 2 and c.fileno() == -1
        message, _, kept_fds = keeper.receive(master_end)
        assert message["op"] == "keep" and len(kept_fds) == 2
        client.sendall(b"burst")
        assert server.recv(64) == b"burst"
        server.sendall(b"reply")
        assert client.recv(64) == b"reply"
        with gevent.Timeout(3):            # the sweep saw the entries change: rebuilt
            while any(type(p) is StowedPair for p in kernel._pairs_by_fd.values()):
                gevent.sleep(0.01)
        client.shutdown(socket.SHUT_WR), server.shutdown(socket.SHUT_WR)
        with gevent.Timeout(5):
            while not ended:
                gevent.sleep(0.01)
        (record, result), = ended
        assert (record["client"], record["up"], record["down"]) == ("198.18.0.1:1", 7, 0)
        assert result == (5, 5, "done", "kernel", 5, 5) and (kernel.unowned, kernel.live_pairs) == (0, 0)
        assert keeper.receive(master_end)[0]["op"] == "drop"
        assert owner == owner[:1]           # the owner heard nothing more
    finally:
        relay.close()
        for fd in kept_fds:
            os.close(fd)
        for s in (client, c, u, server, master_end, worker_end):
            s.close()


def test_a_parked_pair_ends_at_its_idle_limit_and_a_cancel_cleans_it_up(relay, relay_pins):
    """Idle far from its limit, a pair parks: no greenlet, no timer; the sweep then ends it at
    its idle limit (within a sweep's second). A parked pair cancelled (its worker stops) leaves
    nothing in the maps, and never reports."""
    parks = []
    relay.on_park = lambda: parks.append(time.monotonic())
    (client, c), (u, server) = tcp_pair(), tcp_pair()
    started = time.monotonic()
    with gevent.Timeout(10):
        result = run_relay(relay, c, u, idle=4.0)
    assert result == (0, 0, "idle_timeout", "kernel", 0, 0)
    assert len(parks) == 1 and parks[0] - started < 2.5
    assert 4.0 <= time.monotonic() - started < 5.5
    (client2, c2), (u2, server2) = tcp_pair(), tcp_pair()
    done = []
    handle = relay.start(c2, u2, Limits(60.0), done.append)
    wait = time.monotonic() + 5
    while len(parks) < 2 and time.monotonic() < wait:
        gevent.sleep(0.05)
    assert len(parks) == 2 and map_sizes_of(relay_pins.pin_path)["CONNECTION_MAP"] == 2
    handle.cancel()
    gevent.sleep(0.2)
    assert map_sizes_of(relay_pins.pin_path) == {"SOCK_MAP": 0, "SOCK_TARGETS": 0, "CONNECTION_MAP": 0}
    assert done == [] and not relay._idle and relay.live_pairs == 0
    for s in (client, c, u, server, client2, c2, u2, server2):
        s.close()


def test_reset_ends_the_relay_and_reaches_the_other_side(relay):
    client, c = tcp_pair()
    u, server = tcp_pair()
    killer = gevent.spawn_later(0.1, lambda: (
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)), server.close()))
    result = run_relay(relay, c, u, idle=10)
    killer.get()
    assert result.outcome == "reset"
    c.close(), u.close()
    with pytest.raises(ConnectionResetError):
        client.recv(10)
    client.close()


def test_pair_that_half_closed_before_registration(chained):
    """A client that sent everything and its FIN before the relay starts: sockmaps
    refuse such sockets, and the bytes must still arrive."""
    client, c = tcp_pair()
    u, server = tcp_pair()
    client.sendall(b"request" * 1000)
    client.shutdown(socket.SHUT_WR)
    server.sendall(b"greeting")
    time.sleep(0.05)
    answer = Background(lambda: (recv_all(server), server.sendall(b"reply" * 1000), server.close()))
    result = run_relay(chained, c, u, idle=10)
    assert answer.join()[0] == b"request" * 1000
    assert result == (7000, 8 + 5000, "done", "userspace", 0, 0)  # the FIN came first: no kernel
    c.close(), u.close()
    assert recv_all(client) == b"greeting" + b"reply" * 1000


def test_a_pair_beyond_max_pairs_stays_in_userspace(pin_path):
    """With room for one pair, the second is declined (E2BIG on a full map) and the
    Chain relays it in userspace, intact; it is counted, and the maps hold one pair."""
    from sniproxy import bpfload
    from sniproxy.kernel_abi import map_sizes
    loaded = bpfload.load(pin_path, programs=("relay",), cflags=map_sizes(max_pairs=1, dns_cache_size=16))
    kernel = KernelRelay(pin_path)
    chained = Chain.of(UserspaceRelay(), kernel, Handoff(0, 0))
    pairs = [(tcp_pair(), tcp_pair()) for _ in range(2)]
    try:
        relayers = [gevent.spawn(run_relay, chained, c, u, 30) for (_, c), (u, _) in pairs]
        wait_for_sock_map(pin_path, 2)
        gevent.sleep(0.1)
        assert map_sizes_of(pin_path) == {"SOCK_MAP": 2, "SOCK_TARGETS": 2, "CONNECTION_MAP": 2}
        assert kernel.full == 1
        payloads = [(os.urandom(3 << 20), os.urandom(2 << 20)) for _ in pairs]
        # Endpoints in threads: the relays run in this thread's hub.
        jobs = [(Background(send_stream_bytes, client, up), Background(recv_all, server),
                 Background(send_stream_bytes, server, down), Background(recv_all, client))
                for ((client, _), (_, server)), (up, down) in zip(pairs, payloads)]
        gevent.joinall(relayers, timeout=30)
        for (_, got_up, _, got_down), (up, down) in zip(jobs, payloads):
            assert sha(got_up.join()) == sha(up) and sha(got_down.join()) == sha(down)
        results = sorted((r.get(timeout=10) for r in relayers), key=lambda r: r.kind)
        assert [(r.up, r.down, r.outcome, r.kind) for r in results] == [
            (3 << 20, 2 << 20, "done", "kernel"), (3 << 20, 2 << 20, "done", "userspace")]
    finally:
        kernel.close()
        for (client, c), (u, server) in pairs:
            for s in (client, c, u, server):
                s.close()
        loaded.unpin()


# --- a retransmission that overlaps bytes already received ----------------------

def _poll(fn, timeout: float = 3.0):
    """fn() until it returns something, yielding to the hub between tries (the relay's
    greenlet runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while (got := fn()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {fn}"
        gevent.sleep(0.002)
    return got


def _nowait(sock: socket.socket, size: int = MiB) -> bytes | None:
    try:
        return sock.recv(size, socket.MSG_DONTWAIT) or None
    except BlockingIOError:
        return None


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += _poll(lambda: _nowait(sock, size - len(data)))
    return data


def _segment_with_data(capture: LoopbackCapture, sport: int, dport: int) -> Segment:
    """The first TCP segment sport -> dport that carries data."""
    return _poll(lambda: next((s for s in capture.segments()
                               if (s.sport, s.dport) == (sport, dport) and s.payload), None))


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _inject(header: bytes, seq: int, payload: bytes) -> None:
    """Send a copy of the captured segment's header (ports, ack, window, options with
    their timestamps) with another seq and payload, as the client's TCP would."""
    tcp = bytearray(header)
    struct.pack_into("!I", tcp, 4, seq)
    tcp[13] = 0x18                                   # PSH | ACK
    struct.pack_into("!H", tcp, 16, 0)
    loopback = socket.inet_aton("127.0.0.1")
    pseudo = loopback + loopback + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp) + len(payload))
    struct.pack_into("!H", tcp, 16, _checksum(pseudo + bytes(tcp) + payload))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64,
                     socket.IPPROTO_TCP, 0, loopback, loopback)   # the kernel fills in the IP checksum
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + bytes(tcp) + payload, ("127.0.0.1", 0))


def test_a_retransmission_overlapping_received_bytes_is_relayed_once(relay, relay_pins):
    """TCP queues a segment that starts before bytes it already received whole, and the
    verdict is handed whole skbs: the old part would go out twice (a stretch of the
    stream repeated, found by the soak one transfer in a few thousand). Here one such
    segment is injected by hand, and the client's own next segment then overlaps it
    too; the server must see every byte exactly once, and the verdict count the cuts."""
    client, c = tcp_pair()
    u, server = tcp_pair()
    capture = LoopbackCapture(client.getsockname()[1])
    stats = f"{relay_pins.pin_path}/{RELAY_STATS}"
    trimmed_before = percpu_totals(stats, PERCPU_COUNTERS[RELAY_STATS])["trimmed_bytes"]
    watch = gevent.spawn(run_relay, relay, c, u)
    try:
        with PinnedMap.open(f"{relay_pins.pin_path}/SOCK_MAP") as sock_map:
            _poll(lambda: sock_map.lookup(cookie(c)))
        first, second, third = b"A" * 1000, b"B" * 200, b"C" * 100
        client.sendall(first)
        sent = _segment_with_data(capture, client.getsockname()[1], c.getsockname()[1])
        assert sent.payload == first
        assert _read(server, 1000) == first
        _inject(sent.header, sent.seq + 500, first[500:] + second)    # 500 old bytes, 200 new
        client.sendall(second + third)                      # 200 old (injected), 100 new
        assert _read(server, 300) == second + third
        gevent.sleep(0.2)
        assert _nowait(server) is None, "bytes arrived twice"
        with PinnedMap.open(f"{relay_pins.pin_path}/CONNECTION_MAP") as connections:
            entry = Connection.unpack(connections.lookup(cookie(c)))
        assert (entry.trimmed, entry.bytes) == (700, 1300)
        assert percpu_totals(stats, PERCPU_COUNTERS[RELAY_STATS])["trimmed_bytes"] - trimmed_before == 700
    finally:
        watch.kill()
        for s in (capture, client, c, u, server):
            s.close()


def _echo(sock: socket.socket) -> None:
    while data := sock.recv(MiB):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def _exchanges(sock: socket.socket, count: int, size: int) -> float:
    """count exchanges of size random bytes, each echoed whole before the next: seconds."""
    started = time.monotonic()
    for _ in range(count):
        block = os.urandom(size)
        sock.sendall(block)
        got = bytearray()
        while len(got) < size:
            data = sock.recv(size - len(got))
            assert data, f"EOF after {len(got)} of {size} bytes"
            got += data
        assert got == block
    elapsed = time.monotonic() - started
    sock.shutdown(socket.SHUT_WR)
    assert sock.recv(1) == b""
    return elapsed


@pytest.mark.parametrize("batch_bytes, size, batched", [(256 << 10, 8 << 10, True), (0, 8 << 10, False),
                                                        (256 << 10, 1 << 20, False)])
def test_a_fast_pair_in_small_skbs_is_batched_and_what_waits_is_flushed(relay_pins, tmp_path, batch_bytes, size,
                                                                       batched):
    """At batch_rate or more, in skbs of BATCH_BELOW or less, a pair's verdict waits for
    batch_bytes on a socket (its SO_RCVLOWAT), and the flush runs it over what waits every
    BATCH_FLUSH: 300 exchanges of 8 KiB, each echoed whole before the next, never wait for
    a check of the pair. Half-closed, it leaves the batch. With batch_bytes 0, or in skbs of
    64 KiB (1 MiB writes), no low-water mark is ever set. Every byte comes back in order,
    and the worker's kernel_batched counter says whether the pair was batched."""
    table = CounterTable(tmp_path / "counters", create=True)
    relay = KernelRelay(relay_pins.pin_path, batch_bytes=batch_bytes, batch_rate=1 << 20, counters=table.row(0))
    client, c = tcp_pair()
    u, server = tcp_pair()
    client.settimeout(5)
    lowats: set[int] = set()

    def sample():
        while True:
            lowats.add(c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
            gevent.sleep(0.001)
    sampler = gevent.spawn(sample)
    count = 300 if size < MiB else 30
    try:
        echo, exchanges = Background(_echo, server), Background(_exchanges, client, count, size)
        result = run_relay(relay, c, u, idle=30)
        elapsed = exchanges.join()
        echo.join()
    finally:
        sampler.kill()
        relay.close()
    assert result[:3] == (count * size, count * size, "done")
    assert lowats == ({1, batch_bytes} if batched else {1})
    assert (table.totals()["kernel_batched"] > 0) == batched
    assert c.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    assert elapsed < 10, elapsed   # a wait for each check would take minutes
    for s in (client, c, u, server):
        s.close()


def test_a_batched_pairs_last_bytes_wait_no_longer_than_the_flush(relay_pins):
    """A download in 16 KiB writes, batched behind a low-water mark of 256 KiB, ends with
    10 KiB that the sender follows with nothing: the flush hands them over within
    milliseconds. Without it they would wait for the pair's next check, which at this rate
    and a max_queued of 1 GiB comes about a second later. Large fixed buffers stand for
    the ones a fast pair's autotuning grows (small ones would let the window flush it)."""
    relay = KernelRelay(relay_pins.pin_path, batch_bytes=256 << 10, batch_rate=1 << 20, max_queued=1 << 30)
    client, c = tcp_pair()
    u, server = tcp_pair()
    for s in (c, u, client):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    client.settimeout(10)
    block, tail, count = os.urandom(16 << 10), os.urandom(10 << 10), 2048
    tail_sent = []

    def download():
        for _ in range(count):
            server.sendall(block)
        time.sleep(0.2)              # past several flushes: the pair is batched by now
        tail_sent.append(time.monotonic())
        server.sendall(tail)
        assert server.recv(2) == b"ok"
        server.close()

    def receive() -> tuple[bytes, float]:
        got, want = hashlib.sha256(), count * len(block) + len(tail)
        received = 0
        while received < want:
            data = client.recv(MiB)
            assert data, f"EOF after {received} of {want} bytes"
            got.update(data)
            received += len(data)
        arrived = time.monotonic()
        client.sendall(b"ok")
        assert client.recv(1) == b""
        client.close()
        return got.hexdigest(), arrived

    sender, receiver = Background(download), Background(receive)
    try:
        result = run_relay(relay, c, u, idle=30)
        digest, arrived = receiver.join()
        sender.join()
    finally:
        relay.close()
    assert result.outcome == "done"
    assert digest == hashlib.sha256(block * count + tail).hexdigest()
    assert arrived - tail_sent[0] < 0.3, arrived - tail_sent[0]
    for s in (c, u):
        s.close()
