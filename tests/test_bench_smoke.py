"""bench/run end to end, with tiny durations: every system x scenario appears, well formed."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEMS = {"direct", "sniproxy-ebpf", "sniproxy-userspace", "haproxy", "nginx", "sniproxy-debian"}
SCENARIOS = {"bulk", "tls_download", "latency", "conn_rate", "concurrency", "worker_scaling"}
OURS = {"sniproxy-ebpf", "sniproxy-userspace"}
TOOLS = ["iperf3", "wrk", "sockperf", "curl", "openssl", "nginx", "haproxy", "sniproxy"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        pytest.skip(f"benchmark tools missing: {missing} (scripts/setup installs them)")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([str(REPO / "bench/run"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out, done.stdout


def test_every_system_and_scenario_is_present(smoke_run):
    out, _ = smoke_run
    rows = json.loads((out / "results.json").read_text())
    assert {(r["system"], r["scenario"]) for r in rows} == {(s, c) for s in SYSTEMS for c in SCENARIOS}


def test_rows_are_well_formed(smoke_run):
    out, _ = smoke_run
    rows = json.loads((out / "results.json").read_text())
    keys = [(r["system"], r["scenario"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per system x scenario x metric"
    for row in rows:
        assert row["unit"] and row["better"] in ("higher", "lower")
        if row["status"] == "ok":
            assert row["repeats"] == len(row["values"]) >= 1
            assert row["min"] <= row["median"] <= row["max"]
        else:
            assert row["status"] == "failed" and row["error"], row
            assert row["system"] in OURS, f"direct and the peers must work: {row}"


def test_measurements_are_real(smoke_run):
    out, _ = smoke_run
    rows = {(r["system"], r["scenario"], r["metric"]): r for r in json.loads((out / "results.json").read_text())}
    for system in SYSTEMS - OURS:
        assert rows[(system, "bulk", "gbps_1stream")]["median"] > 0.1
        assert rows[(system, "tls_download", "mb_per_s")]["median"] > 1
        assert rows[(system, "concurrency", "connections")]["median"] == 100
        assert 0 < rows[(system, "latency", "p50_us")]["median"] <= rows[(system, "latency", "p99_us")]["median"]
    assert rows[("nginx", "latency", "added_p50_us")]["status"] == "ok"
    assert ("direct", "worker_scaling", "conn_per_s_2workers") not in rows
    assert ("haproxy", "worker_scaling", "conn_per_s_2workers") in rows


def test_report_and_plot_are_written(smoke_run):
    out, stdout = smoke_run
    report = (out / "report.md").read_text()
    for name in SYSTEMS | SCENARIOS:
        assert name in report
    assert "vs best peer" in report
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ETA" in stdout and "elapsed" in stdout


def test_no_child_outlives_the_run(smoke_run):
    out, _ = smoke_run
    config_dirs = subprocess.run(["pgrep", "-af", "sniproxy-bench-"], capture_output=True, text=True).stdout
    assert "sniproxy-bench-" not in config_dirs.replace("pgrep", ""), config_dirs
