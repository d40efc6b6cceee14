"""relay.policy = "auto" in the real master: each connection moves between the copy,
splice and kernel relays by what it does, and no move loses or reorders a byte."""
import os
import socket
import threading
import time

import pytest

from harness import echo_through, free_port, sha, wait_until
from test_proxy import make_config, stats, stats_json

MiB = 1 << 20
# Windows of 0.2 s: at 4 MiB/s or more (0.8 MiB in a window) a pair is fast, and goes to the
# kernel (relay.fast_relay) or splice, and from splice back to copy below half that; a
# window with no byte at all sends it to the kernel.
AUTO = "window = 0.2\nsplice_rate = 4194304\nkernel_rate = 0\n"
MOVES = ("moved_to_copy", "moved_to_splice", "moved_to_kernel")


class Client:
    """A plain TCP client of the echo backend through the proxy: what it sent, and every
    byte that came back, read as it comes."""

    def __init__(self, port: int, first_flight: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.sent = bytearray()
        self.received = bytearray()
        self.send(first_flight)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += data

    def stream(self, data: bytes, expected: int) -> None:
        """Send data from a thread while reading until `expected` bytes came back in all,
        slowly: the proxy then often holds bytes its reader cannot take yet."""
        sender = threading.Thread(target=self.send, args=(data,))
        sender.start()
        self.read_until(expected, chunk=64 << 10, pause=0.001)
        sender.join()

    def read_until(self, total: int, chunk: int = MiB, pause: float = 0.0) -> None:
        while len(self.received) < total:
            got = self.sock.recv(chunk)
            assert got, f"EOF after {len(self.received)} of {total} bytes"
            self.received += got
            time.sleep(pause)

    def finish(self) -> bytes:
        self.sock.shutdown(socket.SHUT_WR)
        while chunk := self.sock.recv(MiB):
            self.received += chunk
        self.sock.close()
        return bytes(self.received)


def moves(p) -> dict[str, int]:
    counted = stats(p)
    return {name: counted[name] for name in MOVES}


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_auto_moves_a_pair_by_its_rate_and_keeps_every_byte_in_order(proxy, plain, request, mode):
    """relay.fast_relay = "splice". Early bytes both ways (the backend speaks first, the
    client streams right behind its first flight); a burst moves the pair to splice; a quiet
    spell moves it back to copy and, with BPF, on to the kernel; a second burst goes through
    there. Both ways, every byte arrives once and in order (sha256)."""
    kernel = mode == "require"
    p, client, greeting, base = _burst(proxy, plain, request, mode, 'fast_relay = "splice"\n')
    wait_until(lambda: moves(p)["moved_to_splice"] > base["moved_to_splice"], what="a move to splice")
    quiet = "moved_to_kernel" if kernel else "moved_to_copy"
    wait_until(lambda: moves(p)[quiet] > base[quiet], timeout=10, what=f"{quiet} once quiet")
    client.stream(os.urandom(16 * MiB), len(greeting) + len(client.sent) + 16 * MiB)
    got = client.finish()
    expected = greeting + bytes(client.sent)
    assert len(got) == len(expected) and sha(got) == sha(expected)
    after = moves(p)
    assert after["moved_to_copy"] > base["moved_to_copy"]   # from splice, when the rate fell
    if kernel:
        assert stats_json(p)["relay_stats"]["relayed_bytes"] >= 2 * 16 * MiB   # the second burst, by the verdict
    else:
        assert after["moved_to_kernel"] == base["moved_to_kernel"]


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_auto_sends_a_fast_pair_to_the_kernel_by_default(proxy, plain, request, mode):
    """relay.fast_relay's default, "kernel": a burst moves the pair straight to the kernel,
    where it stays through a quiet spell and a second burst; without BPF it goes to splice.
    Both ways, every byte arrives once and in order (sha256)."""
    kernel = mode == "require"
    p, client, greeting, base = _burst(proxy, plain, request, mode, "")
    fast = "moved_to_kernel" if kernel else "moved_to_splice"
    wait_until(lambda: moves(p)[fast] > base[fast], what=f"{fast} in the burst")
    time.sleep(0.5)   # two windows without a byte
    client.stream(os.urandom(16 * MiB), len(greeting) + len(client.sent) + 16 * MiB)
    got = client.finish()
    expected = greeting + bytes(client.sent)
    assert len(got) == len(expected) and sha(got) == sha(expected)
    moved = {name: count - base[name] for name, count in moves(p).items()}
    if kernel:   # once, in the first burst: the second went through the verdict
        assert moved == {"moved_to_copy": 0, "moved_to_splice": 0, "moved_to_kernel": 1}
        assert stats_json(p)["relay_stats"]["relayed_bytes"] >= 2 * 16 * MiB
    else:
        assert moved["moved_to_splice"] >= 1 and moved["moved_to_kernel"] == 0


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_auto_judges_a_fast_pair_by_its_first_second_not_its_whole_window(proxy, plain, request, mode):
    """Windows of 30 s at 4 MiB/s: 120 MiB make a window fast, and so do 4 MiB a second of
    it so far (over one second at least): a 16 MiB burst right after connect moves the pair
    on (to the kernel, or splice without BPF) long before its window ends. Every byte
    arrives once and in order (sha256)."""
    kernel = mode == "require"
    p, client, greeting, base = _burst(proxy, plain, request, mode, "", auto="window = 30.0\nsplice_rate = 4194304\n")
    fast = "moved_to_kernel" if kernel else "moved_to_splice"
    wait_until(lambda: moves(p)[fast] > base[fast], timeout=5, what=f"{fast} in the burst")
    got = client.finish()
    expected = greeting + bytes(client.sent)
    assert len(got) == len(expected) and sha(got) == sha(expected)


def _burst(proxy, plain, request, mode: str, relay: str, auto: str = AUTO):
    """A proxy with AUTO (and `relay`) in front of an echo backend that speaks first, and a
    client that has streamed 16 MiB through it right behind its first flight: the proxy,
    the client, the greeting, and the moves counted before."""
    greeting = os.urandom(200_000)
    b = plain("early", greeting=greeting)
    pin_path = request.getfixturevalue("pin_path") if mode == "require" else None
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, mode=mode, pin_path=pin_path, workers=1, policy="auto",
                          relay=auto + relay), wait_ports=(port,))
    base = moves(p)
    client = Client(port, b"\x00" + os.urandom(50_000))     # not TLS: the fallback, an echo
    client.read_until(len(greeting) + len(client.sent))
    client.stream(os.urandom(16 * MiB), len(greeting) + len(client.sent) + 16 * MiB)
    return p, client, greeting, base


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_auto_keeps_request_response_traffic_in_copy(proxy, plain, request, tmp_path, mode):
    """Small exchanges in every window, for several windows: never fast enough for splice,
    never quiet enough for the kernel. The pair stays in copy, and the log says so."""
    b = plain("echo")
    pin_path = request.getfixturevalue("pin_path") if mode == "require" else None
    port = free_port()
    access_log = tmp_path / "access.log"
    p = proxy(make_config(port, [], fallback=b.address, mode=mode, pin_path=pin_path, workers=1, policy="auto",
                          relay=AUTO, extra=f'[log]\naccess = "{access_log}"\n'), wait_ports=(port,))
    base = moves(p)
    client = Client(port, b"\x00")
    client.read_until(1)
    started = time.monotonic()
    while time.monotonic() - started < 1.2:     # six windows, each with 20 exchanges of 2 KiB
        client.send(os.urandom(2048))
        client.read_until(len(client.sent))
        time.sleep(0.01)
    got = client.finish()
    assert sha(got) == sha(bytes(client.sent))
    wait_until(lambda: "outcome=done" in access_log.read_text(), what="the log line")
    assert moves(p) == base
    [line] = [line for line in access_log.read_text().splitlines() if "outcome=done" in line]
    assert " relay=userspace " in line + " "


@pytest.mark.parametrize("mode", ["off", pytest.param("require", marks=pytest.mark.bpf)])
def test_auto_sends_a_chatty_pair_to_the_kernel(proxy, plain, request, tmp_path, mode):
    """Ping-pong of 64-byte messages: 200 reads within a window move the pair to the kernel
    (with BPF), where the rest of the exchanges go through the verdict; without BPF it stays
    in copy. Every byte comes back, in order."""
    b = plain("echo")
    pin_path = request.getfixturevalue("pin_path") if mode == "require" else None
    port = free_port()
    access_log = tmp_path / "access.log"
    p = proxy(make_config(port, [], fallback=b.address, mode=mode, pin_path=pin_path, workers=1, policy="auto",
                          relay=AUTO + "kernel_messages = 200\n", extra=f'[log]\naccess = "{access_log}"\n'),
              wait_ports=(port,))
    kernel = mode == "require"
    base = moves(p)
    client = Client(port, b"\x00")
    client.read_until(1)
    for i in range(1000):
        client.send(os.urandom(64))
        client.read_until(len(client.sent))
    got = client.finish()
    assert sha(got) == sha(bytes(client.sent))
    wait_until(lambda: "outcome=done" in access_log.read_text(), what="the log line")
    after = moves(p)
    assert after["moved_to_kernel"] - base["moved_to_kernel"] == (1 if kernel else 0)
    assert after["moved_to_splice"] == base["moved_to_splice"]
    [line] = [line for line in access_log.read_text().splitlines() if "outcome=done" in line]
    if kernel:   # most of the 64,000 bytes each way went through the verdict
        assert stats_json(p)["relay_stats"]["relayed_bytes"] >= 2 * 800 * 64
        assert " relay=kernel " in line + " "
    else:
        assert " relay=userspace " in line + " "


@pytest.mark.bpf
def test_a_fast_pair_in_small_writes_is_batched_in_the_kernel(proxy, plain, pin_path):
    """Exchanges of 8 KiB, each echoed whole before the next: fast enough to move to the
    kernel, in skbs of 8 KiB. There the verdict runs in batches (bpf.batch_bytes), which the
    worker counts as kernel_batched, and every byte still comes back in order, each
    exchange's tail handed on by the flush."""
    b = plain("echo")
    port = free_port()
    p = proxy(make_config(port, [], fallback=b.address, mode="require", pin_path=pin_path, workers=1,
                          policy="auto", relay=AUTO), wait_ports=(port,))
    client = Client(port, b"\x00")
    client.read_until(1)
    started = time.monotonic()
    while time.monotonic() - started < 5.0 and stats(p)["kernel_batched"] == 0:
        for _ in range(50):
            client.send(os.urandom(8 << 10))
            client.read_until(len(client.sent))
    got = client.finish()
    assert sha(got) == sha(bytes(client.sent))
    counted = stats(p)
    assert counted["moved_to_kernel"] == 1 and counted["kernel_batched"] >= 1


@pytest.mark.parametrize("tls_fast_relay, moved_to", [("splice", "moved_to_splice"),
                                                      ("kernel", "moved_to_kernel")])
@pytest.mark.bpf
def test_auto_sends_a_fast_tls_pair_to_relay_tls_fast_relay(proxy, backends, pin_path, tls_fast_relay, moved_to):
    """A TLS pair (its first flight a ClientHello) that turns fast goes to tls_fast_relay,
    the kernel or splice, while the plain pairs of the tests above go to fast_relay (the
    kernel). 32 MiB echoed through the TLS session come back whole and in order."""
    b = backends("tls")
    port = free_port()
    p = proxy(make_config(port, [("example.com", b.address)], mode="require", pin_path=pin_path, workers=1,
                          policy="auto", relay=AUTO + f'tls_fast_relay = "{tls_fast_relay}"\n'), wait_ports=(port,))
    base = moves(p)
    payload = os.urandom(32 * MiB)
    assert sha(echo_through(port, "example.com", payload)) == sha(payload)
    moved = {name: count - base[name] for name, count in moves(p).items()}
    assert moved[moved_to] >= 1
    assert moved["moved_to_kernel" if moved_to == "moved_to_splice" else "moved_to_splice"] == 0


@pytest.mark.bpf
@pytest.mark.parametrize("fast_relay", ["splice", "kernel"])
def test_a_leaving_worker_hands_its_userspace_pairs_to_the_kernel(proxy, plain, pin_path, fast_relay):
    """A reload: the old worker's pairs in the copy relay (a young pair, and with fast_relay =
    "kernel" the fast one went to the kernel before) and in splice move to the kernel relay,
    which outlives the worker, so that it leaves at once rather than at graceful_timeout (10 s
    here) with the pair cut. Every byte, before and after, comes back in order."""
    b = plain("echo")
    port = free_port()
    config = make_config(port, [], fallback=b.address, mode="require", pin_path=pin_path, workers=1,
                         policy="auto", relay=AUTO.replace("window = 0.2", "window = 5.0") +
                         f'fast_relay = "{fast_relay}"\n')   # fast by its rate; quiet only after 5 s
    p = proxy(config, wait_ports=(port,))
    fast = Client(port, b"\x00" + os.urandom(1000))          # not TLS: the fallback, an echo
    fast.stream(os.urandom(8 * MiB), len(fast.sent) + 8 * MiB)
    young = Client(port, b"\x00" + os.urandom(1000))
    young.read_until(len(young.sent))
    [old] = p.worker_pids()
    before = moves(p)
    assert before["moved_to_kernel" if fast_relay == "kernel" else "moved_to_splice"] == 1
    p.reload(config + "\n")
    wait_until(lambda: old not in p.worker_pids(), timeout=5, what="the old worker to leave")
    kernel_before = before["moved_to_kernel"]
    assert moves(p)["moved_to_kernel"] == kernel_before + (1 if fast_relay == "kernel" else 2)
    for client in (fast, young):
        client.stream(os.urandom(2 * MiB), len(client.sent) + 2 * MiB)
        got = client.finish()
        assert len(got) == len(client.sent) and sha(got) == sha(bytes(client.sent))
