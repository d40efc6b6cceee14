"""The splice relay on loopback TCP: client <-> [c | u] <-> server, its bytes through
pipes. Every test runs twice: with the pairs in C (copypair.c, as the worker runs
them) and with the Python ones (where copypair is not built). The event-loop pair it
shares with the copy relay (bulk both ways, half-close) is tested in test_userspace_relay.py."""
import os
import socket

import gevent
import pytest

from harness import MiB, bulk_both_ways, hub_wait_until, recv_nowait, run_relay, tcp_pair

from sniproxy.relay import Chain, Handoff, Limits
from sniproxy.splice_relay import SpliceRelay
from sniproxy.userspace_relay import UserspaceRelay

pytestmark = pytest.mark.usefixtures("pairs_in")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_pairs_are_the_ones_asked_for(pairs_in):
    relay = SpliceRelay()
    assert (relay._copier is not None) == (pairs_in == "c")
    relay.close()


def test_a_chain_moves_a_pair_from_copy_to_splice_and_back_without_a_byte_lost(pair):
    """copy until 256 KiB moved, then splice until it is quiet, as relay.policy auto
    moves a fast pair: the counts of the relays add up to what both ends sent."""
    copy, splice = UserspaceRelay(buffer_size=16 * 1024), SpliceRelay()
    result = bulk_both_ways(Chain.of(copy, splice, Handoff(256 * 1024, 60)), pair, 5 * MiB, 3 * MiB)
    assert result[:3] == (5 * MiB, 3 * MiB, "done") and result.kind == "splice"
    splice.close()


def test_bytes_left_in_a_pipe_never_reach_the_next_connection(pair):
    """A pair that stops while its pipe holds bytes (read from one socket, never sent to
    the other) closes that pipe, not pools it: the next connection that takes a pipe from
    the pool must not start with them."""
    client, c, u, server = pair
    for s in (u, server):   # a reader that takes little, and nothing at all from now on
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF if s is u else socket.SO_RCVBUF, 16 * 1024)
    relay = SpliceRelay(pool_size=8)
    ended = []
    handle = relay.start(c, u, Limits(30), ended.append)
    client.setblocking(False)
    secret, sent = b"secret of the first connection " * 4096, 0
    for _ in range(200):   # until the client cannot send more: the pipe and every buffer are full
        try:
            sent += client.send(secret[sent % len(secret):])
        except BlockingIOError:
            gevent.sleep(0.05)
            try:
                sent += client.send(secret[sent % len(secret):])
            except BlockingIOError:
                break
    fds = open_fds()
    handle.cancel()
    assert ended == [] and relay.pooled == 0, "a pipe with bytes in it went back to the pool"
    assert open_fds() == fds - 2, "the pipe that held bytes is still open"

    (client2, c2), (u2, server2) = tcp_pair(), tcp_pair()
    try:   # one empty pipe in the pool, then the next pair takes it
        client2.sendall(b"hello")
        client2.shutdown(socket.SHUT_WR), server2.shutdown(socket.SHUT_WR)
        assert run_relay(relay, c2, u2, idle=5)[:3] == (5, 0, "done")
        assert server2.recv(100) == b"hello" and server2.recv(100) == b""
        assert relay.pooled >= 1
        (client3, c3), (u3, server3) = tcp_pair(), tcp_pair()
        client3.sendall(b"again"), client3.shutdown(socket.SHUT_WR), server3.shutdown(socket.SHUT_WR)
        assert run_relay(relay, c3, u3, idle=5)[:3] == (5, 0, "done")
        assert server3.recv(100) == b"again"
        for s in (client3, c3, u3, server3):
            s.close()
    finally:
        relay.close()
        for s in (client2, c2, u2, server2):
            s.close()


def test_idle_pairs_hold_no_pipe():
    """A direction takes a pipe only while bytes are in it: after an exchange each way,
    50 idle pairs hold no pipe at all, and the pool (4 here) is all the relay keeps."""
    relay = SpliceRelay(pool_size=4)
    ends = [(tcp_pair(), tcp_pair()) for _ in range(50)]
    fds_before = open_fds()
    pairs = [relay.start(c, u, Limits(30), lambda result: None) for (client, c), (u, server) in ends]
    for (client, c), (u, server) in ends:
        client.sendall(b"ping")
        server.sendall(b"pong")
    for (client, c), (u, server) in ends:
        assert hub_wait_until(lambda: recv_nowait(server), what="ping") == b"ping"
        assert hub_wait_until(lambda: recv_nowait(client), what="pong") == b"pong"
    gevent.sleep(0.1)
    assert 1 <= relay.pooled <= 4
    assert open_fds() - fds_before == 2 * relay.pooled
    for pair in pairs:
        pair.cancel()
    relay.close()
    assert open_fds() == fds_before
    for pair_ends in ends:
        for s in (*pair_ends[0], *pair_ends[1]):
            s.close()
