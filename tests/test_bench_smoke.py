"""bench/run end to end, with tiny durations: every system x scenario appears, well formed.
One test, so that parallel workers never start two benchmark runs at once."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OURS = {"sniproxy-auto", "sniproxy-kernel", "sniproxy-copy", "sniproxy-splice"}
SYSTEMS = {"direct", *OURS, "haproxy", "haproxy-splice", "nginx", "sniproxy-debian"}
SCENARIOS = {"bulk", "tls_download", "latency", "conn_rate", "concurrency", "active", "mixed", "worker_scaling"}
WITH_WORKERS = {*OURS, "haproxy", "haproxy-splice", "nginx"}
SIDE_BY_SIDE = {"direct", "sniproxy-auto", "haproxy"}   # conn_rate_side_by_side runs these together
TOOLS = ["iperf3", "h2load", "sockperf", "curl", "openssl", "nginx", "haproxy", "sniproxy"]


def test_bench_smoke(tmp_path):
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        pytest.fail(f"benchmark tools missing: {missing} (scripts/setup installs them)")
    done = subprocess.run([str(REPO / "bench/run"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())

    assert {(r["system"], r["scenario"]) for r in rows} == \
        {(s, c) for s in SYSTEMS for c in SCENARIOS} | {(s, "conn_rate_side_by_side") for s in SIDE_BY_SIDE}
    check_rows_are_well_formed(rows)
    check_measurements_are_real({(r["system"], r["scenario"], r["metric"]): r for r in rows})

    report = (tmp_path / "report.md").read_text()
    assert all(name in report for name in SYSTEMS | SCENARIOS)
    assert "vs best peer" in report
    cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    assert f"- CPU: {cpu_model}" in report and f"- kernel: {os.uname().release} " in report
    assert "- CPU vulnerabilities" in report
    assert "## Targets" in report and "| latency added_p50_us: <= best peer |" in report
    rate_target = next(line for line in report.splitlines() if "connection rate, 2 workers" in line)
    assert "not measured" not in rate_target and "vs haproxy" in rate_target, rate_target
    assert "round 1/1" in done.stdout and "sniproxy-auto start with 2 workers" in done.stdout
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ETA" in done.stdout and "elapsed" in done.stdout
    # Every child ran with its config under the run's work directory: none may be left.
    left = subprocess.run(["pgrep", "-af", "sniproxy-benchrun-"], capture_output=True, text=True)
    assert left.returncode == 1, left.stdout


def check_rows_are_well_formed(rows):
    keys = [(r["system"], r["scenario"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per system x scenario x metric"
    for row in rows:
        assert row["unit"] and row["better"] in ("higher", "lower")
        if row["status"] == "ok":
            assert row["repeats"] == len(row["values"]) >= 1
            assert row["min"] <= row["median"] <= row["max"]
        assert row["status"] == "ok", f"every system must work: {row}"


def check_measurements_are_real(rows):
    for system in SYSTEMS:
        assert rows[(system, "bulk", "gbps_1stream")]["median"] > 0.1
        assert rows[(system, "tls_download", "mb_per_s")]["median"] > 1
        assert rows[(system, "concurrency", "connections")]["median"] == 100
        latency = [rows[(system, "latency", m)]["median"] for m in ("p50_us", "p99_us")]
        assert 0 < latency[0] <= latency[1]
        for size in ("16k", "256k"):
            assert rows[(system, "active", f"{size}_req_per_s")]["median"] > 0
            assert 0 < rows[(system, "active", f"{size}_p50_ms")]["median"] <= rows[(system, "active", f"{size}_p99_ms")]["median"]
        mixed = {m: rows[(system, "mixed", m)]["median"] for m in ("idle_connections", "req_per_s", "gbps_2streams")}
        assert mixed["idle_connections"] == 50 and mixed["req_per_s"] > 0 and mixed["gbps_2streams"] > 0.1
        assert rows[(system, "worker_scaling", "conn_per_s_1worker")]["median"] > 0
        if system in WITH_WORKERS:
            assert rows[(system, "worker_scaling", "conn_per_s_2workers")]["median"] > 0
        else:
            assert (system, "worker_scaling", "conn_per_s_2workers") not in rows
        if system != "direct":
            assert (system, "latency", "added_p50_us") in rows
        if system in WITH_WORKERS - {"direct"}:
            assert rows[(system, "conn_rate", "cpu_us_per_conn")]["median"] > 0
        if system in SIDE_BY_SIDE:
            assert rows[(system, "conn_rate_side_by_side", "conn_per_s")]["median"] > 0
            assert ((system, "conn_rate_side_by_side", "cpu_us_per_conn") in rows) == (system != "direct")
    # With BPF, idle connections really go to the kernel: both sockets of each are in SOCK_MAP.
    for system in ("sniproxy-auto", "sniproxy-kernel"):
        assert rows[(system, "concurrency", "kernel_relayed_conns")]["median"] == 100
    assert ("sniproxy-copy", "concurrency", "kernel_relayed_conns") not in rows


@pytest.mark.bpf
def test_kworker_hop_traces_the_relay_redirects():
    """bench/kworker_hop: sockperf through the kernel relay, with every redirect's wait
    for its kworker traced (bpf/kworker_hop.c on the workqueue tracepoints)."""
    done = subprocess.run([str(REPO / "bench/kworker_hop"), "--seconds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines()}
    for label in ("wait for the kworker", "kworker run"):
        runs = int(lines[label].split(":")[1].split()[0])
        assert runs > 1000, lines[label]       # two redirects per round trip, thousands of round trips
        assert " p50 " in lines[label] and " p99 " in lines[label]
    assert "added by the relay" in done.stdout


@pytest.mark.bpf
def test_placement_runs_every_system_in_every_placement():
    """bench/placement: one iperf3 stream per system and CPU placement, with the
    machine's busy CPUs and TCP's reordering counters beside each throughput; loopback's
    receive steering is as it was afterwards."""
    rps_cpus = Path("/sys/class/net/lo/queues/rx-0/rps_cpus")
    before = rps_cpus.read_text()
    done = subprocess.run([str(REPO / "bench/placement"), "--seconds", "1", "--repeats", "1", "--rps", "1"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert {(row[0], row[1]) for row in rows} == {
        (system, placement) for system in ("direct", "sniproxy-kernel", "sniproxy-copy")
        for placement in ("scheduler", "split", "shared")}
    for system, placement, gbps, ratio, busy, ofo, spurious in rows:
        assert float(gbps) > 0 and float(busy) > 0 and float(ofo) >= 0 and float(spurious) >= 0
        assert ratio == "1.00x" if system == "direct" else ratio.endswith("x")
    assert "loopback rps_cpus 1" in done.stdout
    assert rps_cpus.read_text() == before


@pytest.mark.bpf
def test_connrate_measures_every_system_side_by_side(tmp_path):
    """bench/connrate: every system up at once, h2load visiting each in turn; a rate and a
    ratio to HAProxy for each, the proxies' user and system CPU and sleeps per connection, and
    the machine's CPU per connection; --against runs this proxy as of another revision beside,
    and --tree as the package in a directory."""
    build = tmp_path / "build"
    build.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "sniproxy", "bpf"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(build)], input=archive, check=True)
    done = subprocess.run([str(REPO / "bench/connrate"), "--seconds", "1", "--rounds", "2", "--workers", "1",
                           "--against", "HEAD", "--tree", str(build)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("- CPU: ") and any(line.startswith("- kernel: ") for line in lines)   # the machine
    header = next(i for i, line in enumerate(lines) if line.startswith("system "))
    rows = {line.split()[0]: line.split() for line in lines[header + 1:]}
    assert set(rows) == {"direct", "sniproxy-kernel", "sniproxy-copy", "sniproxy-kernel@HEAD", "sniproxy-copy@HEAD",
                         "sniproxy-kernel@build", "sniproxy-copy@build", "haproxy"}
    assert rows["haproxy"][3] == "1.00x"
    for name, row in rows.items():
        assert float(row[1].replace(",", "")) > 100, row   # conn/s median
        if name == "direct":
            assert row[4:7] == ["-", "-", "-"] and float(row[7]) > 0, row   # only the machine's CPU
        else:
            assert float(row[4]) > 0 and float(row[6]) > 0, row   # user, system ms per connection
            assert float(row[8]) > 0, row   # a proxy sleeps between events: at least some per connection
            assert float(row[10]) > 0, row   # the machine's ms per connection
    assert done.stderr.count("[round ") == 2 * len(rows)


def test_a_keepalive_run_reads_only_its_own_requests(tmp_path):
    """h2load appends to its request log: a repeat that reused the log file would count the
    runs before it too, halving its CPU per request and mixing their times into its p99."""
    import sys
    sys.path.insert(0, str(REPO))
    from bench import origins, tools
    from bench.systems import System
    with origins.running("sniproxy-logtest-") as (workdir, backends):
        direct = System(backends, workdir)
        direct.start(1)
        log = tmp_path / "h2load.requests"
        counts = [tools.h2load_keepalive(direct.address("tls"), "16k", 10, 200, 60, log).count for _ in range(2)]
    assert counts == [200, 200]
    assert sum(1 for _ in open(log)) == 200
