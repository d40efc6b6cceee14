"""Kernel-relayed connections outlive their worker (sniproxy/keeper.py): the master
keeps a copy of both sockets of every kernel-relayed pair, and hands the pair to a
live worker when its own exits."""
import hashlib
import os
import random
import signal
import socket
import subprocess
import threading
import time

import pytest

from test_bpf_load import bpftool
from harness import free_port, wait_until
from test_kernel_proxy import _owner, entries

pytestmark = pytest.mark.bpf
GiB, CHUNK = 1 << 30, 1 << 20


def _config(port: int, echo, pin_path: str, access_log) -> str:
    return (f'[master]\nworkers = 2\ngraceful_timeout = 5.0\n'
            f'[bpf]\nmode = "require"\npin_path = "{pin_path}"\n[relay]\npolicy = "kernel"\n'
            f'[log]\naccess = "{access_log}"\n'
            f'[[listener]]\naddress = "127.0.0.1:{port}"\nfallback = "{echo.address}"\n')


def _watcher(client: socket.socket, p) -> int | None:
    try:
        return _owner(client, p.worker_pids())
    except AssertionError:   # none for a moment: the master hands it on
        return None


def _holders(client_address: str) -> str:
    """ss -p lines of the proxy's sockets that still face client_address."""
    return subprocess.run(["ss", "-tanpH", "dst", client_address], capture_output=True, text=True).stdout


def test_a_2_gib_transfer_survives_10_worker_kills_10_reloads_and_an_upgrade(proxy, plain, pin_path, tmp_path):
    """Both ways at once, paced so that the faults fall across it: every second a
    SIGKILL of the worker that watches the pair, a reload, or (once) an upgrade, which
    re-executes the master itself. The bytes arrive intact,
    each kill hands the pair to another worker, and once it ends its log line counts
    every byte and the master keeps nothing."""
    echo = plain("echo")
    port, access_log = free_port(), tmp_path / "access.log"
    p = proxy(_config(port, echo, pin_path, access_log), wait_ports=(port,))
    block = os.urandom(CHUNK)
    sent, received, got = hashlib.sha256(), hashlib.sha256(), [0]
    count = 2 * GiB // CHUNK

    def chunk(i: int) -> bytes:   # made as sent: all of them at once took 2 GiB, and seconds
        return b"\x00" + block[1:] if i == 0 else block[i % 997:] + block[:i % 997]
    faults = ["kill", "reload"] * 10 + ["upgrade"]
    random.Random(7).shuffle(faults)
    master, sock_map_id = p.proc.pid, bpftool("map", "show", "pinned", f"{pin_path}/SOCK_MAP")["id"]
    # Connected just before the first send: the proxy waits timeouts.client_hello for it.
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client_address = "%s:%d" % client.getsockname()

    def read_back():
        while got[0] < 2 * GiB and (data := client.recv(CHUNK)):
            received.update(data)
            got[0] += len(data)
    reader = threading.Thread(target=read_back, daemon=True)
    reader.start()
    kills = 0
    done = []   # (seconds in, fault): what a failure message lists
    started = time.monotonic()
    try:
        for i in range(count):
            data = chunk(i)
            try:
                client.sendall(data)
            except OSError as e:
                raise AssertionError(f"{e} at chunk {i} of {count}, {time.monotonic() - started:.2f} s in, "
                                     f"after {done}; received {got[0]}; the proxy's log:\n{p.output()[-4000:]}") from e
            sent.update(data)
            due = started + i * 22.0 / count      # about 22 s in all
            time.sleep(max(0.0, due - time.monotonic()))
            if faults and time.monotonic() - started > 21 - len(faults):   # one a second from 1 s
                fault = faults.pop()
                done.append((round(time.monotonic() - started, 2), fault))
                if fault == "kill":   # the worker that watches it (once one adopted it)
                    owner = wait_until(lambda: _watcher(client, p), timeout=5, what="a worker to watch the pair")
                    os.kill(owner, signal.SIGKILL)
                    kills += 1
                elif fault == "reload":
                    p.reload()
                else:
                    upgraded = p.output().count("upgraded:")
                    assert p.cli("upgrade").returncode == 0
                    wait_until(lambda: p.output().count("upgraded:") > upgraded, timeout=15, what="the upgrade")
        client.shutdown(socket.SHUT_WR)
        reader.join(60)
        assert not reader.is_alive(), f"the echo stalled at {got[0]} of {2 * GiB} bytes"
        assert (got[0], received.hexdigest()) == (2 * GiB, sent.hexdigest())
        assert client.recv(1) == b""     # the end carried too
    finally:
        client.close()
    assert not faults and kills == 10
    # The same master process, now running the code on disk, over the same maps.
    assert p.proc.pid == master and p.proc.poll() is None
    assert bpftool("map", "show", "pinned", f"{pin_path}/SOCK_MAP")["id"] == sock_map_id
    assert p.output().count("adopted a kernel pair") >= kills
    wait_until(lambda: f"up={2 * GiB} down={2 * GiB}" in access_log.read_text(), timeout=10,
               what="the pair's log line, with every byte")
    line = next(line for line in access_log.read_text().splitlines() if f"up={2 * GiB}" in line)
    assert "relay=kernel outcome=done" in line, line
    wait_until(lambda: entries(pin_path, "SOCK_MAP") == 0 and entries(pin_path, "CONNECTION_MAP") == 0,
               timeout=10, what="the maps to empty")
    wait_until(lambda: f"pid={p.proc.pid}," not in _holders(client_address), timeout=10,
               what="the master to close its copies")


def test_an_upgrade_with_a_bad_config_is_refused_and_changes_nothing(proxy, plain, pin_path, tmp_path):
    echo = plain("echo")
    port = free_port()
    good = _config(port, echo, pin_path, tmp_path / "access.log")
    p = proxy(good, wait_ports=(port,))
    workers = p.worker_pids()
    p.write(good + "[nonsense]\n")
    refused = p.cli("upgrade")     # the command checks the config first
    assert refused.returncode == 1 and "nonsense" in refused.stderr
    p.signal(signal.SIGUSR2)       # and so does the master, for a signal sent by hand
    wait_until(lambda: "upgrade refused" in p.output(), timeout=30, what="the refusal")
    assert "nonsense" in p.output().split("upgrade refused", 1)[1].splitlines()[0]
    assert p.worker_pids() == workers and "upgrading" not in p.output()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"\x00still served")
        assert c.recv(100) == b"\x00still served"


def test_the_packing_dictionary_holds_every_field_of_a_kept_record():
    """Deflate finds a kept record's field names in the dictionary, and not in the state
    itself. Each one missing cost its bytes in every stowed pair: two of them moved a
    stowed pair's bytes to the next size class, and a worker's RSS rose 0.15 KiB a pair."""
    from sniproxy import keeper
    from sniproxy.accesslog import AccessLog
    fields = [f for f in AccessLog.FIELDS if f != "duration"] + ["started_at", "most"]   # relay.py's Chain
    assert [f for f in fields if f'"{f}"'.encode() not in keeper._DICTIONARY] == []


def test_a_kept_state_travels_and_waits_packed_to_a_third():
    """The master holds a state for every kernel pair: packed, a typical one (a real
    access-log record, sides with real byte counts) takes at most a third of its JSON,
    and unpacks to the same state, through the channel, beside its two fds."""
    import json
    from sniproxy import keeper
    state = {"key": 0x1234_5678_9abc, "record": {
        "client": "198.18.0.7:51234", "listener": "0.0.0.0:443", "name": "www.example.test", "alpn": "h2",
        "backend": "198.18.1.2:443", "up": 1913, "down": 0, "relay": "userspace", "outcome": "",
        "started_at": 1764300632.123456, "most": 1913},
        "sides": [{"early": 0, "consumed0": 1913, "received0": 1914, "state0": 1, "written0": 1,
                   "in_userspace": False},
                  {"early": 517, "consumed0": 6213, "received0": 6214, "state0": 1, "written0": 1914,
                   "in_userspace": False}]}
    packed = keeper.pack(state)
    assert len(packed) * 3 <= len(json.dumps(state)), (len(packed), len(json.dumps(state)))
    master, worker = keeper.channel()
    a, b = socket.socketpair()
    with master, worker, a, b:
        keeper.send(worker, {"op": "keep", "key": state["key"]}, (a.fileno(), b.fileno()), packed)
        message, got, fds = wait_until(lambda: keeper.receive(master), what="the keep message")
        assert message == {"op": "keep", "key": state["key"]} and len(fds) == 2
        assert keeper.unpack(got) == state
        for fd in fds:
            os.close(fd)


def test_the_channel_holds_a_handover_and_a_keep_that_cannot_wait_leaks_no_fd():
    """10,000 idle pairs reach the kernel relay in one handover, a keep message each: the
    channel takes them all with their fds before the master reads one, so none waits in the
    worker with copies of its fds. Past that, a keep that must wait where the worker has no
    fd left for the copies fails, and leaves no fd behind."""
    import resource
    import gevent
    from sniproxy import keeper
    master, worker = keeper.channel()
    a, b = socket.socketpair()
    packed = keeper.pack({"key": 1, "record": {}, "sides": []})
    with master, worker, a, b:
        # A loop of its own, destroyed at the end: a watcher left started in the hub's would
        # flush, in a later test of this process, to fds that others then hold.
        loop = gevent.get_hub().loop_class(default=False)
        link = keeper.Link(worker, loop)
        try:
            for key in range(10_000):
                link.send({"op": "keep", "key": key}, (a.fileno(), b.fileno()), packed)
            assert not link.waiting
            while not link.waiting:   # fill it: the next ones wait, with their copies
                link.send({"op": "keep", "key": -1}, (a.fileno(), b.fileno()), packed)
            fillers = [os.dup(a.fileno())]   # every free fd below the highest open one, taken
            while fillers[-1] < max(map(int, os.listdir("/proc/self/fd"))) - 1:
                fillers.append(os.dup(a.fileno()))
            spare = fillers.pop()
            os.close(spare)
            fds = len(os.listdir("/proc/self/fd"))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (spare + 1, hard))   # room for one copy, not two
            try:
                with pytest.raises(OSError):
                    link.send({"op": "keep", "key": -2}, (a.fileno(), b.fileno()), packed)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert len(os.listdir("/proc/self/fd")) == fds
            for fd in fillers:
                os.close(fd)
            received = 0
            while (got := keeper.receive(master)) is not None:
                received += 1
                for fd in got[2]:
                    os.close(fd)
            assert received >= 10_000
        finally:   # what waits holds copies of fds
            for _, copies, _ in link.waiting:
                keeper._close(copies)
            link.waiting.clear()
            loop.destroy()


def test_a_handover_waits_for_a_full_channel_and_closes_nothing():
    """The master hands a dead worker's pair to a live one whose channel is full: the pair
    waits for the next turn, its sockets open (closing them ended a live connection), and
    goes over once the worker has read what filled the channel."""
    from sniproxy import keeper
    master, worker = keeper.channel()
    a, b = socket.socketpair()
    k = keeper.Keeper()
    k.add_worker(4242, master)
    with master, worker, a, b:
        copies = (os.dup(a.fileno()), os.dup(b.fileno()))
        k.orphans = [keeper.join(copies, keeper.pack({"key": 7, "record": {}, "sides": []}))]
        filled = 0
        while True:
            try:
                keeper.send(master, {"op": "filler"})
            except BlockingIOError:
                break
            filled += 1
        k.hand_over([4242])
        assert len(k.orphans) == 1 and k.kept[4242] == {}
        assert [os.fstat(fd).st_ino for fd in copies] == [os.fstat(s.fileno()).st_ino for s in (a, b)]
        for _ in range(filled):
            assert keeper.receive(worker)[0] == {"op": "filler"}
        k.hand_over([4242])
        assert k.orphans == [] and list(k.kept[4242]) == [7]
        message, _, fds = keeper.receive(worker)
        assert message == {"op": "adopt"} and len(fds) == 2
        for fd in fds:
            os.close(fd)
        k.close()
