"""The master's reap, murder and spawn on real child processes, without a whole proxy.

A Master is built from a config and never started: it gets only what those methods
read, the real things where they are cheap (RuntimePaths in tmp_path for its state
file, a BpfSetup that never loaded anything, a counters file). Its workers are real
forked children with real Heartbeats. A heartbeat is made late without waiting by
writing an old monotonic stamp into its file, as a worker that stopped beating
leaves it.
"""
import errno
import faulthandler
import json
import os
import resource
import select
import signal
import struct
import time
import types

import pytest
from harness import free_port

from sniproxy import config as config_mod
from sniproxy import master as master_mod
from sniproxy.bpfsetup import BpfSetup
from sniproxy.counters import CounterTable
from sniproxy.master import Master, StartError, WorkerProcess
from sniproxy.runtime import RuntimePaths
from sniproxy.worker import BOOT_ERROR, SIGNALS, Heartbeat, Worker

WORKER_TIMEOUT = 10.0
STAMP = struct.Struct("d")     # what Heartbeat.beat writes at offset 0


# --- children -------------------------------------------------------------------

class Children:
    """Forks real children and kills and reaps whichever are left, whatever happens."""

    def __init__(self):
        self.pids: list[int] = []

    def fork(self, body=lambda: 0) -> int:
        """A child that runs body() and exits with what it returns; never back into pytest."""
        pid = os.fork()
        if pid == 0:
            code = 70
            try:
                faulthandler.disable()   # pytest's: SIGABRT must kill the way it kills a worker
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                code = body()
            finally:
                os._exit(code if isinstance(code, int) else 71)
        self.pids.append(pid)
        return pid

    def cleanup(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass   # reaped already, by the test or by the master


@pytest.fixture
def children():
    made = Children()
    try:
        yield made
    finally:
        made.cleanup()


def sleeper() -> int:
    time.sleep(30)   # bounded: an orphan goes away by itself
    return 0


def exiting(code: int):
    return lambda: code


def abort_recorder(report: int):
    """A stuck worker that survives SIGABRT: it reports b"R" once it has SIGABRT
    blocked, b"A" for each SIGABRT, and goes on sleeping; only SIGKILL ends it."""
    def body() -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGABRT})
        os.write(report, b"R")
        while signal.sigtimedwait({signal.SIGABRT}, 30) is not None:
            os.write(report, b"A")
        return 0
    return body


def exit_code(pid: int, timeout: float = 5.0) -> int:
    """Reap pid: its exit status, or minus the signal that ended it."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            pytest.fail(f"child {pid} still runs after {timeout}s")
        time.sleep(0.01)


def has_exited(pid: int, within: float = 0.0) -> bool:
    """Whether pid has exited (waiting up to `within`), leaving it for someone to reap."""
    deadline = time.monotonic() + within
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def read_report(fd: int, timeout: float) -> bytes:
    """What a child wrote to fd within timeout (b"" when nothing came)."""
    readable, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 65536) if readable else b""


# --- the master -------------------------------------------------------------------

def stamp(heartbeat: Heartbeat, age: float) -> None:
    """Leave in the heartbeat file what a worker that last beat `age` seconds ago left."""
    os.pwrite(heartbeat.fd, STAMP.pack(time.monotonic() - age), 0)


def file_identity(fd: int):
    """(device, inode) of what fd is open on, or None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        assert e.errno == errno.EBADF
        return None
    return st.st_dev, st.st_ino


def blocked_signals(status: str) -> set[int]:
    """The signals in a /proc/PID/status text's SigBlk mask."""
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)
    return {sig for sig in range(1, 65) if mask & (1 << (sig - 1))}


@pytest.fixture
def make_master(tmp_path):
    """make_master(workers=2) -> a Master that was never started, ready for reap and murder;
    its remaining heartbeats, listening sockets and pipes are closed after the test."""
    made = []

    def make(workers: int = 2) -> Master:
        port = free_port()
        cfg = config_mod.load(text=(
            f"[master]\nworkers = {workers}\nworker_timeout = {WORKER_TIMEOUT}\ngraceful_timeout = 1.0\n"
            f'[bpf]\nmode = "off"\n'
            f'[[listener]]\naddress = "127.0.0.1:{port}"\n'))
        master = Master(cfg, None)
        master.paths = RuntimePaths(tmp_path / f"master{len(made)}.pid")
        master.counters_path = str(master.paths.counters)
        CounterTable(master.counters_path, create=True)
        master.bpf = BpfSetup(cfg)     # never started: relays in userspace, pins nothing
        made.append(master)
        return master

    try:
        yield make
    finally:
        for master in made:
            for w in master.workers.values():
                w.heartbeat.close()
            for sock in master.sockets.values():
                sock.close()
            for fd in (getattr(master, "_wake_r", None), getattr(master, "_wake_w", None)):
                if fd is not None:
                    os.close(fd)


def register(master: Master, pid: int, index: int, heartbeat: Heartbeat | None = None) -> WorkerProcess:
    """pid as the master's worker of slot index, the way spawn_worker records one."""
    master.spawned += 1
    w = WorkerProcess(pid, index, master.spawned, master.generation, heartbeat or Heartbeat())
    master.workers[pid] = w
    return w


def state_workers(master: Master) -> list[dict]:
    state = json.loads(master.paths.state.read_text())
    assert state["pid"] == os.getpid() and state["relay"] == "userspace"
    assert state["counters"] == master.counters_path and state["bpf"] == ["relay: userspace"]
    return state["workers"]


# --- Heartbeat ----------------------------------------------------------------------

def test_heartbeat_ages_and_a_beat_resets_it():
    before = time.monotonic()
    hb = Heartbeat()
    try:
        assert os.fstat(hb.fd).st_nlink == 0          # unlinked: nothing left behind in /tmp
        (stamped,) = STAMP.unpack(os.pread(hb.fd, STAMP.size, 0))
        assert before <= stamped <= time.monotonic()   # stamped when made, in the file
        time.sleep(0.2)
        start = time.monotonic()
        later = hb.age()
        assert start - stamped <= later <= time.monotonic() - stamped   # age is read from the file
        assert later >= 0.2
        start = time.monotonic()
        hb.beat()
        assert 0 <= hb.age() <= time.monotonic() - start
        stamp(hb, 100)
        assert 100 <= hb.age() < later + 100
    finally:
        hb.close()


def test_heartbeat_beat_in_a_forked_child_is_seen_by_the_parent(children):
    hb = Heartbeat()
    try:
        stamp(hb, 100)
        assert hb.age() >= 100
        start = time.monotonic()
        pid = children.fork(lambda: hb.beat() or 0)     # the worker beats its inherited copy
        assert exit_code(pid) == 0
        assert 0 <= hb.age() <= time.monotonic() - start
    finally:
        hb.close()


# --- reap -----------------------------------------------------------------------------

def test_reap_removes_an_exited_worker_and_closes_its_heartbeat(make_master, children, caplog):
    master = make_master()
    exited = register(master, children.fork(exiting(7)), index=0)
    running = register(master, children.fork(sleeper), index=1)
    heartbeat = file_identity(exited.heartbeat.fd)
    assert heartbeat is not None
    assert has_exited(exited.pid, within=5)

    master.reap_workers()

    assert list(master.workers) == [running.pid]
    assert file_identity(exited.heartbeat.fd) != heartbeat      # closed (its number may be reused)
    assert file_identity(running.heartbeat.fd) is not None
    assert f"worker 0 (pid {exited.pid}) exited with status 7; replacing it" in caplog.text
    with pytest.raises(ChildProcessError):
        os.waitpid(exited.pid, os.WNOHANG)                      # reaped: no zombie left
    assert not has_exited(running.pid)

    master.reap_workers()                                       # nothing more to reap
    assert list(master.workers) == [running.pid]


def test_reap_writes_state_after_a_death(make_master, children):
    master = make_master()
    exited = register(master, children.fork(exiting(0)), index=0)
    running = register(master, children.fork(sleeper), index=1)
    assert has_exited(exited.pid, within=5)

    master.reap_workers()

    assert state_workers(master) == [{"pid": running.pid, "index": 1, "number": running.number, "generation": 0}]


def test_reap_raises_start_error_when_a_worker_cannot_boot(make_master, children):
    master = make_master()
    failed = register(master, children.fork(exiting(BOOT_ERROR)), index=1)
    register(master, children.fork(sleeper), index=0)
    assert has_exited(failed.pid, within=5)

    with pytest.raises(StartError, match=r"^worker 1 failed to boot; see the log above$"):
        master.reap_workers()
    assert failed.pid not in master.workers and len(master.workers) == 1


def test_reap_ignores_children_that_are_not_workers(make_master, children):
    master = make_master()
    stranger = children.fork(exiting(0))      # forked first: waitpid(-1) returns it first
    exited = register(master, children.fork(exiting(0)), index=0)
    running = register(master, children.fork(sleeper), index=1)
    assert has_exited(stranger, within=5) and has_exited(exited.pid, within=5)

    master.reap_workers()

    assert list(master.workers) == [running.pid]     # the stranger changed nothing,
    with pytest.raises(ChildProcessError):           # and the worker after it was reaped too
        os.waitpid(exited.pid, os.WNOHANG)


# --- murder -----------------------------------------------------------------------------

def test_late_worker_gets_sigabrt_and_a_fresh_one_is_left_alone(make_master, children):
    master = make_master()
    late = register(master, children.fork(sleeper), index=0)
    fresh = register(master, children.fork(sleeper), index=1)
    stamp(late.heartbeat, WORKER_TIMEOUT + 0.5)
    stamp(fresh.heartbeat, WORKER_TIMEOUT - 2)      # late, but not past the timeout

    master.murder_late_workers()

    assert exit_code(late.pid) == -signal.SIGABRT
    assert late.aborted_at > 0
    assert not has_exited(fresh.pid, within=0.2)
    assert fresh.aborted_at == 0.0


def test_stuck_worker_gets_sigkill_after_the_grace(make_master, children, monkeypatch):
    monkeypatch.setattr(master_mod, "KILL_GRACE", 1.0)
    master = make_master()
    report_r, report_w = os.pipe()
    try:
        stuck = register(master, children.fork(abort_recorder(report_w)), index=0)
        assert read_report(report_r, 5) == b"R"
        stamp(stuck.heartbeat, WORKER_TIMEOUT + 1)

        master.murder_late_workers()
        assert read_report(report_r, 5) == b"A"           # SIGABRT first
        aborted_at = stuck.aborted_at
        assert aborted_at > 0

        master.murder_late_workers()                       # within the grace: nothing more
        assert read_report(report_r, 0.1) == b""
        assert not has_exited(stuck.pid, within=0.1)
        assert stuck.aborted_at == aborted_at

        while time.monotonic() - aborted_at <= master_mod.KILL_GRACE:
            time.sleep(0.02)
        master.murder_late_workers()
        assert exit_code(stuck.pid) == -signal.SIGKILL
        assert read_report(report_r, 0.05) == b""          # no second SIGABRT on the way
    finally:
        os.close(report_r)
        os.close(report_w)


def test_stop_past_its_deadline_kills_every_worker(make_master, children):
    master = make_master()
    workers = [register(master, children.fork(sleeper), index=i) for i in range(2)]
    master.stopping = True
    master.stop_deadline = time.monotonic() + 60

    master.murder_late_workers()                        # fresh heartbeats, deadline ahead
    assert not any(has_exited(w.pid, within=0.1) for w in workers)

    master.stop_deadline = time.monotonic() - 0.01
    master.murder_late_workers()
    assert [exit_code(w.pid) for w in workers] == [-signal.SIGKILL, -signal.SIGKILL]


# --- spawn: the signals stay blocked from fork until the worker takes them ---------------

def spawn_and_probe(master: Master, children: Children, monkeypatch) -> dict:
    """Spawn slot 0's worker for real, with Worker.run replaced by a probe that reports,
    first thing in the child, its blocked signals and what it was told to close."""
    master.bind_listeners(master.cfg)
    master._wake_r, master._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    report_r, report_w = os.pipe()

    def probe(worker: Worker) -> None:
        try:
            with open("/proc/self/status") as status:
                blocked = sorted(blocked_signals(status.read()))
            os.write(report_w, json.dumps({"blocked": blocked, "index": worker.index, "number": worker.number,
                                           "inherited": worker.inherited}).encode())
        finally:
            os._exit(0)

    monkeypatch.setattr(Worker, "run", probe)
    try:
        master.spawn_worker(0)
        (pid,) = master.workers
        children.pids.append(pid)
        report = json.loads(read_report(report_r, 5))
        assert exit_code(pid) == 0                   # the probe ran, and left through os._exit
        report["pid"] = pid
        return report
    finally:
        os.close(report_r)
        os.close(report_w)


def test_spawned_worker_starts_with_the_signals_blocked_and_the_master_gets_its_mask_back(
        make_master, children, monkeypatch):
    master = make_master(workers=2)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not before & set(SIGNALS), "the test needs them unblocked in the master to mean anything"
    try:
        report = spawn_and_probe(master, children, monkeypatch)
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)

    assert set(SIGNALS) <= set(report["blocked"]), report["blocked"]
    assert after == before
    w = master.workers[report["pid"]]
    assert (w.index, w.number, w.generation) == (0, 1, 0) == (report["index"], report["number"], 0)
    # The child is told to close the master's pipes and the other slot's socket, not its own.
    other_slot = [sock.fileno() for (slot, _), sock in master.sockets.items() if slot == 1]
    own_slot = [sock.fileno() for (slot, _), sock in master.sockets.items() if slot == 0]
    assert len(other_slot) == len(own_slot) == 1
    assert {master._wake_r, master._wake_w, *other_slot} <= set(report["inherited"])
    assert own_slot[0] not in report["inherited"]


def test_negative_check_the_spawn_probe_sees_no_block_when_the_master_skips_it(
        make_master, children, monkeypatch):
    """The probe above reads a real mask: with the master's SIG_BLOCK made a no-op, it
    reports none of the signals blocked (so a master that forgot the block fails it)."""
    def sigmask(how, sigs):
        return signal.pthread_sigmask(signal.SIG_BLOCK, []) if how == signal.SIG_BLOCK \
            else signal.pthread_sigmask(how, sigs)
    monkeypatch.setattr(master_mod, "signal", types.SimpleNamespace(
        **{**vars(signal), "pthread_sigmask": sigmask}))
    master = make_master(workers=1)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        report = spawn_and_probe(master, children, monkeypatch)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert not set(SIGNALS) & set(report["blocked"]), report["blocked"]
