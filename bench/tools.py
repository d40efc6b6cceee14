"""The load generators (none of them Python): how to call them and read their results."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.origins import BIG_FILE, SMALL_FILE, SNI_NAME

# slack (each call): seconds for startup, handshakes and teardown on top of a tool's
# nominal duration; a system that stalls a tool costs no more than that.
SLOWEST_DOWNLOAD = 20e6  # bytes/s below which a download counts as stalled


@dataclass(frozen=True)
class Transfer:
    rate: float         # in the tool's unit (Gbit/s or MB/s)
    bytes: int


def iperf3(address: tuple[str, int], seconds: int, streams: int, reverse: bool, slack: float,
           affinity: str | None = None) -> Transfer:
    """affinity: iperf3's -A "client_cpu,server_cpu" (the server is told over the control
    connection), or None to leave both to the scheduler."""
    host, port = address
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams),
            "-J", "--connect-timeout", "5000"] + (["-R"] if reverse else []) + (["-A", affinity] if affinity else [])
    # iperf3 -J reports its errors in the JSON, with a non-zero exit status.
    out = procs.run(argv, seconds + slack, check=False)
    try:
        report = json.loads(out)
    except ValueError:
        raise RuntimeError(f"iperf3 printed no JSON: {_tail(out)}") from None
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    if received["bytes"] <= 0:
        raise RuntimeError("iperf3 moved no bytes")
    return Transfer(received["bits_per_second"] / 1e9, int(received["bytes"]))


def curl_download(address: tuple[str, int], expected_bytes: int, slack: float) -> Transfer:
    """Download the big file over TLS with SNI_NAME, through address."""
    host, port = address
    timeout = slack + expected_bytes / SLOWEST_DOWNLOAD
    out = procs.run(["curl", "-sS", "-k", "-o", "/dev/null", "--max-time", str(int(timeout)),
                     "--resolve", f"{SNI_NAME}:{port}:{host}",
                     "-w", "%{http_code} %{size_download} %{speed_download}",
                     f"https://{SNI_NAME}:{port}/{BIG_FILE}"], timeout + 5)
    status, size, speed = out.split()
    if status != "200" or int(size) != expected_bytes:
        raise RuntimeError(f"curl got HTTP {status} with {size} of {expected_bytes} bytes")
    return Transfer(float(speed) / 1e6, int(size))


def _tail(out: str) -> str:
    return " | ".join(line.strip() for line in out.strip().splitlines()[-2:])


_PERCENTILE = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def sockperf_ping_pong(address: tuple[str, int], seconds: int, slack: float) -> dict[float, float]:
    """Round-trip percentiles (us) of 64-byte request/response messages over one TCP connection."""
    host, port = address
    out = procs.run(["sockperf", "ping-pong", "--tcp", "-i", host, "-p", str(port),
                     "-t", str(seconds), "-m", "64", "--full-rtt"], seconds + slack)
    found = {float(p): float(v) for p, v in _PERCENTILE.findall(out)}
    if 50.0 not in found or 99.0 not in found:
        raise RuntimeError(f"sockperf printed no percentiles: {_tail(out)}")
    return found


_H2LOAD_RESULT = re.compile(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout")
_H2LOAD_RATE = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
CALIBRATION_CONNECTIONS = 200


def h2load_requests_for(address: tuple[str, int], seconds: int, slack: float, connections: int = 16) -> int:
    """How many connections a run of about `seconds` makes, from a short run."""
    rate = h2load_connections(address, CALIBRATION_CONNECTIONS, slack, connections)
    return max(CALIBRATION_CONNECTIONS, int(rate * seconds))


def h2load_connections(address: tuple[str, int], requests: int, timeout: float, connections: int = 16) -> float:
    """TLS connections per second of `requests` connections, one HTTP/1.1 request each
    (Connection: close); h2load_requests_for sizes the count to a duration.

    h2load, not wrk: wrk waits for a TLS handshake by polling for writability, so it spins
    until the ServerHello arrives and burns more CPU the slower a proxy answers, CPU the
    proxy then lacks on a small machine. h2load waits for readability. Its -D mode hangs
    when servers close connections, hence a count."""
    return _h2load(address, ["-n", str(requests), "-c", str(min(connections, requests)), "-H", "Connection: close"],
                   SMALL_FILE, requests, timeout)


def _h2load(address: tuple[str, int], args: list[str], path: str, requests: int, timeout: float) -> float:
    """Run h2load over HTTP/1.1 to the TLS origin's `path` through address; its requests per
    second, once every one of `requests` succeeded."""
    host, port = address
    out = procs.run(["h2load", "--h1", *args, f"--connect-to={host}:{port}", f"https://{SNI_NAME}/{path}"], timeout)
    counts, rate = _H2LOAD_RESULT.search(out), _H2LOAD_RATE.search(out)
    if not counts or not rate:
        raise RuntimeError(f"h2load printed no result: {_tail(out)}")
    succeeded, failed, errored, timed_out = map(int, counts.groups())
    if succeeded != requests:
        raise RuntimeError(f"h2load: {succeeded} of {requests} requests succeeded "
                           f"({failed} failed, {errored} errored, {timed_out} timed out)")
    return float(rate.group(1))


@dataclass(frozen=True)
class Requests:
    per_s: float
    p50_ms: float
    p99_ms: float
    count: int


def h2load_keepalive(address: tuple[str, int], path: str, connections: int, requests: int, timeout: float,
                     log_path) -> Requests:
    """`requests` HTTP/1.1 requests over `connections` keep-alive TLS connections:
    requests per second, and the p50 and p99 of the request times h2load logs. A count,
    not a duration: h2load's -D mode hung through every proxy at 1,000 connections."""
    # h2load appends to its log: what an earlier run left there would count as this run's.
    Path(log_path).unlink(missing_ok=True)
    rate = _h2load(address, ["-c", str(connections), "-n", str(requests), "-t", "1", f"--log-file={log_path}"],
                   path, requests, timeout)
    times = sorted(int(line.split()[2]) for line in open(log_path) if line.strip())   # start, status, us
    if len(times) != requests:
        raise RuntimeError(f"h2load logged {len(times)} requests of {requests}")
    return Requests(rate, times[len(times) // 2] / 1e3, times[int(len(times) * 0.99)] / 1e3,
                    len(times))
