"""The performance targets of the eBPF relay, checked against the medians of one run."""

import operator
from dataclasses import dataclass

EBPF, USERSPACE, DIRECT = "sniproxy-ebpf", "sniproxy-userspace", "direct"
IDLE_TARGET = 10_000
_AT_LEAST, _AT_MOST, _BELOW = operator.ge, operator.le, operator.lt


@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str      # the eBPF relay's median, and what it was compared with
    met: bool | None   # None: a side of the comparison was not measured


class Medians:
    """The medians of one run's successful rows, by system, scenario and metric."""

    def __init__(self, rows: list[dict], peers: tuple[str, ...]):
        self.peers = peers
        self._by_key = {(r["system"], r["scenario"], r["metric"]): r for r in rows if r["status"] == "ok"}

    def get(self, system: str, scenario: str, metric: str) -> float | None:
        row = self._by_key.get((system, scenario, metric))
        return row["median"] if row else None

    def unit(self, scenario: str, metric: str) -> str:
        return next((r["unit"] for k, r in self._by_key.items() if k[1:] == (scenario, metric)), "")

    def best_peer(self, scenario: str, metric: str, pick) -> tuple[str, float | None]:
        measured = {p: self.get(p, scenario, metric) for p in self.peers}
        measured = {p: v for p, v in measured.items() if v is not None}
        if not measured:
            return "best peer", None
        name = pick(measured, key=measured.get)
        return name, measured[name]


def _relative(medians: Medians, scenario: str, metric: str, comparison, factor: float,
              reference: tuple[str, float | None], target: str) -> Verdict:
    """eBPF's median against factor x a reference system's median."""
    value, (ref_name, ref) = medians.get(EBPF, scenario, metric), reference
    if value is None or ref is None:
        return Verdict(target, f"not measured ({EBPF}: {_num(value)}, {ref_name}: {_num(ref)})", None)
    unit = medians.unit(scenario, metric)
    ratio = f" = {value / ref:.2f}x" if ref else ""
    measured = f"{_num(value)} {unit} vs {ref_name} {_num(ref)}{ratio}"
    return Verdict(target, measured, comparison(value, factor * ref))


def _absolute(medians: Medians, scenario: str, metric: str, comparison, limit: float,
              target: str, note: str = "") -> Verdict:
    value = medians.get(EBPF, scenario, metric)
    if value is None:
        return Verdict(target, "not measured", None)
    return Verdict(target, f"{_num(value)} {medians.unit(scenario, metric)}{note}", comparison(value, limit))


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def evaluate(rows: list[dict], peers: tuple[str, ...]) -> list[Verdict]:
    medians = Medians(rows, peers)
    verdicts = []
    bulk = [r["metric"] for r in rows if r["system"] == EBPF and r["scenario"] == "bulk"
            and r["metric"].startswith("gbps_")]
    for metric in bulk:
        verdicts += [
            _relative(medians, "bulk", metric, _AT_LEAST, 0.9, (DIRECT, medians.get(DIRECT, "bulk", metric)),
                      f"bulk {metric}: eBPF >= 0.9x direct"),
            _relative(medians, "bulk", metric, _AT_LEAST, 1.5, medians.best_peer("bulk", metric, max),
                      f"bulk {metric}: eBPF >= 1.5x best peer")]
    verdicts += [
        _relative(medians, "bulk", "cpu_proc_s_per_gb", _AT_MOST, 0.1,
                  (USERSPACE, medians.get(USERSPACE, "bulk", "cpu_proc_s_per_gb")),
                  "proxy CPU per GB (bulk): eBPF <= 0.1x userspace"),
        _relative(medians, "bulk", "cpu_total_s_per_gb", _BELOW, 1.0,
                  medians.best_peer("bulk", "cpu_total_s_per_gb", min),
                  "system-wide CPU per GB (bulk): eBPF below every peer"),
        _absolute(medians, "latency", "added_p50_us", _AT_MOST, 10.0, "added latency p50 <= 10 us"),
        _absolute(medians, "latency", "added_p99_us", _AT_MOST, 50.0, "added latency p99 <= 50 us")]
    for metric in ("added_p50_us", "added_p99_us"):
        verdicts.append(_relative(medians, "latency", metric, _BELOW, 1.0,
                                  (USERSPACE, medians.get(USERSPACE, "latency", metric)),
                                  f"{metric}: eBPF below userspace"))
    verdicts.append(_relative(medians, "worker_scaling", "conn_per_s_2workers", _AT_LEAST, 1.0,
                              ("haproxy", medians.get("haproxy", "worker_scaling", "conn_per_s_2workers")),
                              "connection rate, 2 workers: eBPF >= HAProxy (2 threads)"))
    held = medians.get(EBPF, "concurrency", "connections")
    relayed = medians.get(EBPF, "concurrency", "kernel_relayed_conns")
    note = f" at {_num(held)} idle connections, {_num(relayed)} of them kernel-relayed"
    if held is not None and held < IDLE_TARGET:
        note += f" (fewer than the {IDLE_TARGET:,} of the target)"
    verdicts.append(_absolute(medians, "concurrency", "rss_kib_per_conn", _AT_MOST, 10.0,
                              f"proxy RSS per kernel-relayed idle connection <= 10 KiB at {IDLE_TARGET:,}", note))
    return verdicts


def markdown(verdicts: list[Verdict]) -> list[str]:
    met = sum(v.met is True for v in verdicts)
    lines = ["## Targets", "",
             f"{met} of {len(verdicts)} met. Medians of this run; `x` is the ratio of the eBPF relay's "
             "median to the reference's.", "",
             "| target | measured | result |", "|---|---|---|"]
    for v in verdicts:
        result = "not measured" if v.met is None else "met" if v.met else "**not met**"
        lines.append(f"| {v.target} | {v.measured} | {result} |")
    return lines + [""]
