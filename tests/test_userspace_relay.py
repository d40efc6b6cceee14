"""The userspace relay, alone and in a Chain, on loopback TCP: client <-> [c | u] <-> server.

The relay runs in this thread's gevent hub, as in a worker; endpoints that block
(bulk senders and readers) run in OS threads. Every test runs twice: with the
pairs in C (copypair.c, as the worker runs them) and with the Python ones (where
copypair is not built). Bulk and half-close run through the splice relay too;
test_splice_relay.py tests its pipes.
"""
from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import gevent
import pytest

from harness import (MiB, Background, bulk_both_ways, hub_wait_until, recv_exactly, recv_nowait, recv_stream,
                     run_relay, send_stream)
from sniproxy.relay import Chain, Handoff, Limits, Progress, RelayResult
from sniproxy import userspace_relay
from sniproxy.splice_relay import SpliceRelay
from sniproxy.userspace_relay import UserspaceRelay

pytestmark = pytest.mark.usefixtures("pairs_in")


def test_the_pairs_run_compiled_from_their_current_source():
    """scripts/setup builds copypair.c (setup.py); a build older than its source would test stale code."""
    from pathlib import Path
    built = Path(userspace_relay.copypair.__file__)
    assert built.suffix == ".so"
    assert built.with_name("copypair.c").stat().st_mtime <= built.stat().st_mtime, \
        "copypair.c is newer than its compiled module: run scripts/setup"


def test_a_pair_that_cannot_start_closes_no_descriptor_but_its_own(pair):
    """A handoff that is not a Handoff fails copypair's Copier.pair before the pair's
    directions are set up: freeing it must close or pool no descriptor, and descriptor 0
    (here a pipe of the test's) least of all."""
    _, c, u, _ = pair
    copier = UserspaceRelay()._compiled(64 * 1024, 0, 0)   # the C pairs, whichever the fixture chose
    r, w = os.pipe()
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        with pytest.raises(TypeError):
            copier.pair(c.fileno(), u.fileno(), 5.0, None, ("not", "a", "handoff", 0, 0), lambda result: None)
        os.write(w, b"x")
        assert os.read(0, 1) == b"x", "descriptor 0 is not the pipe it was"
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)


# The copy relay, and the splice relay, whose pairs are the same but for how a direction
# moves bytes: through a pipe, which holds what its reader cannot take yet.
RELAYS = {"copy": lambda: UserspaceRelay(buffer_size=64 * 1024), "splice": lambda: SpliceRelay(pool_size=4)}


@pytest.mark.parametrize("kind", RELAYS)
def test_bulk_both_directions(pair, kind):
    _, c, u, _ = pair
    for s in (c, u):   # small send buffers: the relay often holds bytes its reader cannot take yet
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
    relay = RELAYS[kind]()
    assert bulk_both_ways(relay, pair, 9 * MiB + 7, 6 * MiB + 3) == \
        RelayResult(9 * MiB + 7, 6 * MiB + 3, "done", relay.kind)
    relay.close()


@pytest.mark.parametrize("kind", RELAYS)
@pytest.mark.parametrize("first_to_close", ["client", "server"])
def test_half_close_is_carried_while_the_other_direction_flows(pair, first_to_close, kind):
    client, c, u, server = pair
    closer, other = (client, server) if first_to_close == "client" else (server, client)

    def closer_side():
        sent = send_stream(closer, MiB, 3)        # then SHUT_WR
        return sent, recv_stream(closer)           # and still reads

    def other_side():
        got = recv_stream(other)                   # returns only at the carried FIN
        return got, send_stream(other, 4 * MiB, 4)

    a, b = Background(closer_side), Background(other_side)
    relay = RELAYS[kind]()
    result = run_relay(relay, c, u, idle=20)
    relay.close()
    (closer_sent, closer_got), (other_got, other_sent) = a.join(), b.join()
    assert other_got == (MiB, closer_sent)
    assert closer_got == (4 * MiB, other_sent)
    up, down = (MiB, 4 * MiB) if first_to_close == "client" else (4 * MiB, MiB)
    assert result == RelayResult(up, down, "done", relay.kind)


def relay_once(c, u, idle: float, half_closed: float | None = None, handoff: Handoff | None = None,
               relay=None) -> RelayResult:
    """Relay until on_done, then check it is not called again (a second call would end
    a Connection twice)."""
    done = []
    relay = relay or UserspaceRelay(buffer_size=16 * 1024)
    relay.start(c, u, Limits(idle, half_closed), done.append, **({"handoff": handoff} if handoff else {}))
    hub_wait_until(lambda: done, timeout=idle + 10, what="on_done")
    gevent.sleep(0.05)
    [result] = done
    return result


def test_idle_timeout(pair):
    client, c, u, server = pair
    client.sendall(b"hello")
    started = time.monotonic()
    assert relay_once(c, u, idle=0.3) == RelayResult(5, 0, "idle_timeout")
    assert 0.3 <= time.monotonic() - started < 1.5
    assert recv_exactly(server, 5) == b"hello"


def test_activity_postpones_the_idle_timeout(pair):
    client, c, u, server = pair

    def tick():
        for _ in range(8):
            client.send(b"x")
            gevent.sleep(0.1)
    ticker = gevent.spawn(tick)
    started = time.monotonic()
    result = relay_once(c, u, idle=0.3)
    ticker.get()
    assert result == RelayResult(8, 0, "idle_timeout")
    assert 0.9 <= time.monotonic() - started < 2.5   # 8 ticks 0.1 s apart, then a full idle limit
    assert recv_exactly(server, 8) == b"x" * 8


@pytest.mark.parametrize("idle, half_closed", [(10, 0.3), (0.3, 10)])
def test_the_shorter_limit_applies_once_a_direction_ended(pair, idle, half_closed):
    client, c, u, server = pair
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    started = time.monotonic()
    assert relay_once(c, u, idle, half_closed) == RelayResult(7, 0, "idle_timeout")
    assert 0.3 <= time.monotonic() - started < 1.5
    assert recv_exactly(server, 8) == b"request"      # and then the FIN


def test_half_closed_limit_does_not_apply_before_a_direction_ended(pair):
    client, c, u, server = pair
    started = time.monotonic()
    assert relay_once(c, u, idle=0.6, half_closed=0.1) == RelayResult(0, 0, "idle_timeout")
    assert 0.6 <= time.monotonic() - started < 2


def test_reset_is_an_outcome(pair):
    client, c, u, server = pair
    client.sendall(b"abc")
    # SO_LINGER 0: close() sends an RST instead of a FIN.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gevent.spawn_later(0.1, server.close)
    assert relay_once(c, u, idle=10) == RelayResult(3, 0, "reset")


def read_until_stopped(sock: socket.socket, stop: threading.Event) -> bytes:
    """What arrives on sock, slowly, until stop is set and nothing more is queued."""
    sock.settimeout(0.05)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(64 * 1024)
        except TimeoutError:
            if stop.is_set():
                return bytes(data)
            continue
        data += chunk
        time.sleep(0.001)


def test_handoff_by_bytes_holds_no_byte_back(pair):
    """Stopped for the next relay while bytes flow toward a lagging reader: every byte
    was either delivered or is still queued in c, none held by the stopped relay."""
    client, c, u, server = pair
    u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)   # so the relay often holds bytes
    payload = random.Random(5).randbytes(4 * MiB)
    sender = Background(lambda: (client.sendall(payload), client.shutdown(socket.SHUT_WR)))
    server.sendall(b"greeting")
    stop = threading.Event()
    reader = Background(read_until_stopped, server, stop)
    result = relay_once(c, u, idle=10, handoff=Handoff(MiB, 60))
    stop.set()
    delivered = reader.join()
    assert result.outcome == "fast" and result.up + result.down >= MiB and result.down in (0, 8)
    assert len(delivered) == result.up
    rest = recv_exactly(c, len(payload))       # still queued for the next relay, up to the FIN
    sender.join()
    assert delivered + rest == payload
    assert recv_exactly(client, result.down) == b"greeting"[:result.down]


def test_handoff_by_age_of_a_quiet_pair(pair):
    client, c, u, server = pair
    client.sendall(b"early")
    started = time.monotonic()
    assert relay_once(c, u, idle=10, handoff=Handoff(1 << 40, 0.1)) == RelayResult(5, 0, "quiet")
    assert 0.1 <= time.monotonic() - started < 1.5
    assert recv_exactly(server, 5) == b"early"
    client.sendall(b"later")
    gevent.sleep(0.05)
    assert recv_nowait(server) is None and recv_nowait(c) == b"later"   # the relay let go


def test_a_busy_window_starts_the_next_and_the_first_quiet_one_ends_the_relay(pair):
    """Handoff with quiet = 0, windows of 0.15 s: while bytes arrive every 0.1 s, each window
    is followed by the next; only a whole window without a byte ends it, with "quiet"."""
    client, c, u, server = pair

    def trickle():
        for i in range(6):
            client.sendall(bytes([i]) * 100)
            time.sleep(0.1)
    sender = Background(trickle)
    started = time.monotonic()
    result = relay_once(c, u, idle=10, handoff=Handoff(1 << 40, 0.15, quiet=0))
    elapsed = time.monotonic() - started
    sender.join()
    assert result == RelayResult(600, 0, "quiet")
    assert elapsed >= 0.5 + 0.15          # a whole window after the last byte, at 0.5 s
    assert recv_exactly(server, 600) == b"".join(bytes([i]) * 100 for i in range(6))


@pytest.mark.parametrize("size, outcome", [(64, "chatty"), (4096, "quiet")])
def test_a_chatty_pair_is_handed_on_after_so_many_small_messages(pair, size, outcome):
    """Handoff(messages=40), windows of 1 s: 20 exchanges of 64 bytes (40 reads) end the
    relay with "chatty" at the last one, before the window is out; 4 KiB exchanges average
    more than SMALL_MESSAGE a read, and the relay waits for a quiet window instead."""
    client, c, u, server = pair

    def ping_pong():
        for i in range(20):
            client.sendall(bytes([i]) * size)
            server.sendall(recv_exactly(server, size))
            assert recv_exactly(client, size) == bytes([i]) * size
    talker = Background(ping_pong)
    started = time.monotonic()
    result = relay_once(c, u, idle=10, handoff=Handoff(1 << 40, 1.0, quiet=0, messages=40))
    elapsed = time.monotonic() - started
    talker.join()
    assert result == RelayResult(20 * size, 20 * size, outcome)
    assert elapsed < 1.0 if outcome == "chatty" else elapsed >= 1.0


def test_cancel_stops_without_on_done(pair):
    client, c, u, server = pair
    done = []
    handle = UserspaceRelay().start(c, u, Limits(0.2), done.append)
    client.sendall(b"before")
    assert hub_wait_until(lambda: recv_nowait(server), what="bytes through") == b"before"
    handle.cancel()
    client.sendall(b"after")
    gevent.sleep(0.5)                      # past the idle limit too
    assert done == []
    assert recv_nowait(server) is None
    assert recv_exactly(c, 5) == b"after"   # left where it arrived


class Then:
    """A stand-in for the kernel relay behind a Chain: a userspace relay that takes
    `before=` and records what it was given and what it ended with. With decline_after,
    it stops once that many bytes moved and declines the rest of the pair."""
    kind = "then"
    wants_record = False

    def __init__(self, decline_after: int | None = None):
        self.relay, self.decline_after = UserspaceRelay(buffer_size=16 * 1024), decline_after
        self.befores, self.results = [], []

    def start(self, client, upstream, limits, on_done, handoff=None, before=None, record=None):
        self.befores.append(before)

        def ended(result: RelayResult) -> None:
            if result.outcome == "fast":
                result = result._replace(outcome="declined")
            self.results.append(result)
            on_done(result)
        handoff = Handoff(self.decline_after, 60) if self.decline_after is not None else None
        return self.relay.start(client, upstream, limits, ended, handoff=handoff)

    def close(self):
        pass


class Recording(UserspaceRelay):
    """A UserspaceRelay that keeps each RelayResult it ends with."""

    def __init__(self):
        super().__init__(buffer_size=16 * 1024)
        self.results = []

    def start(self, client, upstream, limits, on_done, handoff=None, before=None, record=None):
        return super().start(client, upstream, limits, lambda r: (self.results.append(r), on_done(r)), handoff)


def test_chain_hands_off_and_the_counts_add_up(pair):
    first, then = Recording(), Then()
    result = bulk_both_ways(Chain.of(first, then, Handoff(256 * 1024, 60)), pair, 5 * MiB, 3 * MiB)
    assert result == RelayResult(5 * MiB, 3 * MiB, "done")
    [handed], [finished] = first.results, then.results
    assert handed.outcome == "fast" and handed.up + handed.down >= 256 * 1024
    assert (handed.up + finished.up, handed.down + finished.down) == (5 * MiB, 3 * MiB)
    assert then.befores == [None]          # handed off by bytes: no pace to pass on


def test_chain_with_a_zero_handoff_starts_in_then(pair):
    first, then = Recording(), Then()
    result = bulk_both_ways(Chain.of(first, then, Handoff(0, 0)), pair, MiB, 2 * MiB)
    assert result == RelayResult(MiB, 2 * MiB, "done")
    assert (first.results, then.befores, then.results) == ([], [None], [result])


def test_chain_passes_progress_of_a_pair_handed_off_by_age(pair):
    client, c, u, server = pair
    client.sendall(b"hi")
    then = Then()
    started = time.monotonic()
    result = relay_once(c, u, idle=0.5, relay=Chain.of(UserspaceRelay(), then, Handoff(1 << 30, 0.1)))
    assert result == RelayResult(2, 0, "idle_timeout")
    [progress] = then.befores
    assert isinstance(progress, Progress) and progress.moved == 2 and 0.1 <= progress.seconds < 1
    assert 0.5 <= time.monotonic() - started < 2.5


def test_chain_takes_a_declined_pair_back_to_first(pair):
    first, then = Recording(), Then(decline_after=512 * 1024)
    result = bulk_both_ways(Chain.of(first, then, Handoff(256 * 1024, 60)), pair, 4 * MiB, 2 * MiB)
    assert result == RelayResult(4 * MiB, 2 * MiB, "done")
    handed, back = first.results                 # first twice: before the handoff, after the decline
    [declined] = then.results
    assert (handed.outcome, declined.outcome, back.outcome) == ("fast", "declined", "done")
    assert declined.up + declined.down >= 512 * 1024
    assert sum(r.up for r in (handed, declined, back)) == 4 * MiB
    assert sum(r.down for r in (handed, declined, back)) == 2 * MiB
    assert then.befores == [None]


def test_a_leaving_chain_moves_its_pairs_on_with_every_byte_in_order(pair):
    """The worker is leaving (a reload): a pair in the first relay stops at once, holding no
    byte, and goes on in the next, which Chain.of picks for LEAVING when it is the kernel's."""
    client, c, u, server = pair
    then = Then()
    then.kind = "kernel"
    chain = Chain.of(UserspaceRelay(), then, Handoff(1 << 40, 60))
    done = []
    chain.start(c, u, Limits(30), done.append)
    client.sendall(b"before")
    assert hub_wait_until(lambda: recv_nowait(server), what="bytes through") == b"before"
    chain.leaving()
    [left] = then.results or [None]   # not ended yet: it holds the pair now
    assert left is None and then.befores == [None]
    client.sendall(b"after")
    server.sendall(b"reply")
    assert hub_wait_until(lambda: recv_nowait(server), what="bytes after") == b"after"
    assert hub_wait_until(lambda: recv_nowait(client), what="the reply") == b"reply"
    client.shutdown(socket.SHUT_WR)
    server.shutdown(socket.SHUT_WR)
    hub_wait_until(lambda: done, what="the end")
    assert done[0][:3] == (11, 5, "done")
    assert [r.outcome for r in then.results] == ["done"]
