"""Results: collected per system x scenario x metric, written as JSON, Markdown and a PNG."""

import json
import statistics
from pathlib import Path

from bench import targets
from bench.scenarios import LOWER, Metric
from bench.systems import PEERS


class Results:
    def __init__(self):
        self._rows: dict[tuple[str, str, str], dict] = {}

    def expect(self, system: str, scenario: str, metric: Metric) -> None:
        self._rows.setdefault((system, scenario, metric.name), {
            "system": system, "scenario": scenario, "metric": metric.name, "unit": metric.unit,
            "better": metric.better, "values": [], "error": ""})

    def add(self, system: str, scenario: str, metric: str, value: float) -> None:
        self._rows[(system, scenario, metric)]["values"].append(value)

    def fail(self, system: str, scenario: str, metric: str, reason: str) -> None:
        row = self._rows[(system, scenario, metric)]
        row["error"] = row["error"] or reason  # the first failure is the cause

    def fail_all(self, system: str, scenario: str, metrics: list[Metric], reason: str) -> None:
        for metric in metrics:
            self.fail(system, scenario, metric.name, reason)

    def rows(self) -> list[dict]:
        rows = [_summarize(dict(row)) for row in self._rows.values()]
        return rows + latency_over_direct(rows)


def _summarize(row: dict) -> dict:
    values = row.pop("values")
    ok = bool(values)
    row.update(repeats=len(values), values=values,
               median=statistics.median(values) if ok else None,
               min=min(values) if ok else None, max=max(values) if ok else None,
               status="ok" if ok else "failed")
    if ok and not row["error"]:
        del row["error"]
    elif not ok:
        row["error"] = row["error"] or "not measured"
    return row


def latency_over_direct(rows: list[dict]) -> list[dict]:
    """Added round-trip latency: each system's latency minus direct's median."""
    direct = {r["metric"]: r["median"] for r in rows
              if r["system"] == "direct" and r["scenario"] == "latency" and r["status"] == "ok"}
    added = []
    for row in rows:
        if row["scenario"] != "latency" or row["system"] == "direct":
            continue
        base = direct.get(row["metric"])
        values = [v - base for v in row["values"]] if base is not None else []
        new = {"system": row["system"], "scenario": "latency", "metric": "added_" + row["metric"],
               "unit": row["unit"], "better": LOWER, "values": values,
               "error": row.get("error") or ("" if base is not None else "no direct baseline")}
        added.append(_summarize(new))
    return added


def write_json(rows: list[dict], path: Path) -> None:
    path.write_text(json.dumps(rows, indent=1) + "\n")


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "-"
    return f"{value / reference:.2f}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def write_markdown(rows: list[dict], path: Path, header: list[str]) -> None:
    lines = ["# sniproxy benchmark", ""] + header + [
        "", "Medians over the repeats; min and max beside them. For bulk, tls_download, latency and active (the",
        "targets' scenarios) every system runs at once, and in each repeat each system takes its turn, seconds",
        "apart, one system further on each repeat; a repeat of tls_download begins with a turn not counted.",
        "The other scenarios take every system through one repeat (each started fresh) before the next",
        "repeat; the systems of `conn_rate_side_by_side` run together, and take turns round after round.",
        "Ratios are median / reference:",
        "`vs direct` against no proxy at all, `vs best peer` against the best of "
        f"{', '.join(PEERS)} for that metric (named). Whether higher or lower is better is given per metric.", "",
        "CPU per GB relayed: `cpu_proc` counts the proxy's own processes (master and workers); "
        "`cpu_total` counts everything taking part (proxy, load generator, origin servers, kernel threads "
        "such as sockmap's kworkers; softirq work lands on the task it interrupts), not the machine's "
        "other load. `ctx_switches_per_gb` counts the whole machine's context switches (a kernel relay "
        "that wakes its kworker for every skb shows there). `rss_kib_per_conn` is the growth of the proxy's RSS from before it first held idle "
        "connections, per connection held; `kernel_relayed_conns` counts the held connections whose "
        "sockets are in the pinned SOCK_MAP.", ""]
    lines += targets.markdown(targets.evaluate(rows, PEERS))
    medians = targets.Medians(rows, PEERS)
    for scenario in dict.fromkeys(r["scenario"] for r in rows):
        lines += [f"## {scenario}", "",
                  "| metric | system | median | min | max | n | vs direct | vs best peer |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for row in [r for r in rows if r["scenario"] == scenario]:
            metric = f"{row['metric']} ({row['unit']}, {row['better']} is better)"
            if row["status"] != "ok":
                lines.append(f"| {metric} | {row['system']} | failed: {row['error']} |  |  |  |  |  |")
                continue
            peer, best = medians.best_peer(scenario, row["metric"], min if row["better"] == LOWER else max)
            vs_peer = f"{_ratio(row['median'], best)} ({peer})" if best is not None else "-"
            direct = medians.get(targets.DIRECT, scenario, row["metric"])
            lines.append(f"| {metric} | {row['system']} | {_fmt(row['median'])} | {_fmt(row['min'])} | "
                         f"{_fmt(row['max'])} | {row['repeats']} | "
                         f"{_ratio(row['median'], direct)} | {vs_peer} |")
        lines.append("")
    path.write_text("\n".join(lines))


def write_plot(rows: list[dict], path: Path) -> None:
    """One bar chart per metric: medians per system, whiskers from min to max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    metrics = sorted(dict.fromkeys((r["scenario"], r["metric"], r["unit"]) for r in rows),
                     key=lambda m: scenarios.index(m[0]))  # stable: metric order within a scenario
    systems = list(dict.fromkeys(r["system"] for r in rows))
    columns = 4
    lines = (len(metrics) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.2 * lines), squeeze=False)
    for ax, (scenario, metric, unit) in zip(axes.flat, metrics):
        by_system = {r["system"]: r for r in rows
                     if (r["scenario"], r["metric"]) == (scenario, metric) and r["status"] == "ok"}
        names = [s for s in systems if s in by_system]
        medians = [by_system[s]["median"] for s in names]
        below = [m - by_system[s]["min"] for s, m in zip(names, medians)]
        above = [by_system[s]["max"] - m for s, m in zip(names, medians)]
        ax.bar(range(len(names)), medians, yerr=[below, above], capsize=3,
               color=[f"C{systems.index(s)}" for s in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{scenario}: {metric}", fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
