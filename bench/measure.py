"""What the machine says about a system's cost: CPU time, RSS, kernel socket memory."""

import os
import resource
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def in_turn(systems: list, number: int) -> list:
    """The order systems take their turns in round `number` (from 1): one system further on
    each round, so that none always comes first, or always right after the same one (after
    direct, say, whose run leaves thousands of sockets in TIME_WAIT)."""
    turn = (number - 1) % max(len(systems), 1)
    return systems[turn:] + systems[:turn]


def process_tree(root: int) -> list[int]:
    """root and all its descendants (a proxy's master and workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat:
                children.setdefault(int(stat[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the command name (state is [0], ppid is [1])."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads)."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the processes (all their threads): user and kernel CPU seconds."""
    user = system = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat:
            user, system = user + int(stat[11]), system + int(stat[12])
    return user / _TICKS, system / _TICKS


def _status_field(status: Path, field: str) -> int:
    """A number from a /proc .../status file; 0 once the process or thread is gone."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def sleeps(pids: list[int]) -> int:
    """Voluntary context switches of every thread of the processes: how often they went
    to sleep waiting for something (each one a wakeup later)."""
    return sum(_status_field(task / "status", "voluntary_ctxt_switches")
               for pid in pids for task in Path(f"/proc/{pid}/task").glob("*"))


def rss_bytes(pids: list[int]) -> int:
    return sum(_status_field(Path(f"/proc/{pid}/status"), "VmRSS") * 1024 for pid in pids)


def socket_memory_bytes() -> int:
    """Kernel memory charged to TCP sockets (/proc/net/sockstat 'TCP: ... mem PAGES')."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1]) * _PAGE
    return 0


def busy_cpu_seconds() -> float:
    """CPU time spent not idle by the whole machine, summed over CPUs."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS  # guest time is already in user


def context_switches() -> int:
    """Context switches on the whole machine since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("ctxt "):
            return int(line.split()[1])
    raise RuntimeError("no ctxt line in /proc/stat")


def tcp_ext_counters(*names: str) -> dict[str, int]:
    """TcpExt counters of the whole machine since boot (/proc/net/netstat), by name."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for header, values in zip(lines[::2], lines[1::2]):
        if header.startswith("TcpExt:"):
            found = dict(zip(header.split()[1:], map(int, values.split()[1:])))
            return {name: found[name] for name in names}
    raise RuntimeError("no TcpExt in /proc/net/netstat")


def idle_busy_rate(seconds: float) -> float:
    """Busy CPU-seconds per second while nothing of ours runs: the machine's other load."""
    start_busy, start = busy_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (busy_cpu_seconds() - start_busy) / (time.monotonic() - start)


_KTHREADD = 2  # the parent of every kernel thread


def taking_part_cpu() -> tuple[dict[int, float], float]:
    """CPU of everything that moves the benchmark's bytes: the processes it started (proxies,
    origins) and itself, and the kernel threads (sockmap's kworkers, ksoftirqd), by pid; and
    the load generators it has waited for. Softirq work is charged to the task it interrupts
    (tick accounting), so it lands in these too. The machine's other, unrelated load stays out."""
    finished = resource.getrusage(resource.RUSAGE_CHILDREN)
    pids = process_tree(os.getpid()) + process_tree(_KTHREADD)
    return {pid: cpu_seconds([pid]) for pid in pids}, finished.ru_utime + finished.ru_stime


class CpuMeter:
    """CPU used by a system's processes, and by everything taking part, during a measurement.
    Load generators must have finished (been waited for) before read()."""

    def __init__(self, pids: list[int]):
        self._pids = pids
        self._proc0, self._all0 = cpu_seconds(pids), taking_part_cpu()
        self._switches0 = context_switches()

    def read(self) -> tuple[float, float]:
        """(the system's own CPU-seconds, CPU-seconds of everything taking part) so far."""
        (start, waited0), (end, waited) = self._all0, taking_part_cpu()
        # By pid, over the processes alive at the end: an idle kworker that exits meanwhile
        # takes its whole CPU history with it, which a plain difference of sums would subtract.
        total = sum(cpu - start.get(pid, 0.0) for pid, cpu in end.items()) + waited - waited0
        return cpu_seconds(self._pids) - self._proc0, total

    def switches(self) -> int:
        """Context switches on the whole machine so far (a kernel relay that wakes a
        kworker per skb shows here)."""
        return context_switches() - self._switches0


def machine() -> list[str]:
    """What a result depends on beyond the code: CPU model, kernel build, and the CPU
    vulnerabilities' mitigations (one kernel build ran every recv/send relay 2-3x faster)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    uname = os.uname()
    mitigated = [f"{p.name}: {p.read_text().strip()}"
                 for p in sorted(Path("/sys/devices/system/cpu/vulnerabilities").glob("*"))
                 if p.read_text().strip() != "Not affected"]
    return [f"- CPU: {model}, {os.cpu_count()} CPUs",
            f"- kernel: {uname.release} {uname.version}",
            f"- CPU vulnerabilities (all others not affected): {'; '.join(mitigated) or 'none'}"]
