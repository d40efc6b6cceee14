"""The splice relay on socket pairs: what only it does (the pipes); the event-loop pair
it shares with the userspace relay is tested in test_userspace_relay.py."""
import os
import socket

import gevent

from harness import hub_wait_until, recv_nowait, run_relay, tcp_pair

from sniproxy.relay import Limits
from sniproxy.splice_relay import SpliceRelay, _queued


def test_bytes_left_in_a_pipe_never_reach_the_next_connection():
    """A pair that ends on an error may leave bytes in its pipe (read from one socket,
    never sent to the other): that pipe is closed, not pooled, so no later connection
    starts with them. Empty pipes are pooled and reused."""
    relay = SpliceRelay(pool_size=8)
    (client, c), (u, server) = tcp_pair(), tcp_pair()
    pair = relay.start(c, u, Limits(5), lambda result: None)
    pair.up.pipe, pair.down.pipe = relay._new_pipe(), relay._new_pipe()   # as a transfer holds them
    os.write(pair.up.pipe[1], b"secret of the first connection")   # as an error would leave it
    left, empty = pair.up.pipe, pair.down.pipe
    pair.cancel()
    assert relay._pool == [empty]
    try:
        os.fstat(left[0])
        assert False, "the pipe that held bytes is still open"
    except OSError:
        pass
    (client2, c2), (u2, server2) = tcp_pair(), tcp_pair()
    client2.sendall(b"hello")
    client2.shutdown(socket.SHUT_WR), server2.shutdown(socket.SHUT_WR)
    assert run_relay(relay, c2, u2, idle=5)[:3] == (5, 0, "done")
    assert server2.recv(100) == b"hello" and server2.recv(100) == b""
    assert len(relay._pool) >= 1 and all(_queued(r) == 0 for r, _ in relay._pool)
    relay.close()
    for s in (client, c, u, server, client2, c2, u2, server2):
        s.close()


def test_idle_pairs_hold_no_pipe():
    """A direction takes a pipe only while bytes are in it: after an exchange each way,
    50 idle pairs hold no pipe at all, and the pool (4 here) is all the relay keeps."""
    relay = SpliceRelay(pool_size=4)
    ends = [(tcp_pair(), tcp_pair()) for _ in range(50)]
    fds_before = len(os.listdir("/proc/self/fd"))
    pairs = [relay.start(c, u, Limits(30), lambda result: None) for (client, c), (u, server) in ends]
    for (client, c), (u, server) in ends:
        client.sendall(b"ping")
        server.sendall(b"pong")
    for (client, c), (u, server) in ends:
        assert hub_wait_until(lambda: recv_nowait(server), what="ping") == b"ping"
        assert hub_wait_until(lambda: recv_nowait(client), what="pong") == b"pong"
    gevent.sleep(0.1)
    assert all(d.pipe is None for pair in pairs for d in (pair.up, pair.down))
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 2 * 4
    for pair in pairs:
        pair.cancel()
    relay.close()
    for pair_ends in ends:
        for s in (*pair_ends[0], *pair_ends[1]):
            s.close()
