"""PNG charts of one run's report: each drawn only when its metric was run."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from bench.bench_e2e import PEERS
from bench.bench_profile import PROFILED, layers_seen

COLOURS = {
    "taskdock": "#1f77b4",
    "baseline": "#ff7f0e",
    "hello": "#ff7f0e",
    "submit": "#1f77b4",
    "poll": "#2ca02c",
}


def draw(report: dict[str, Any], base: Path) -> list[Path]:
    """Writes <base>-<chart>.png for every chart the report has data for."""
    charts = {
        "concurrency": concurrency,
        "latency": latency,
        "cpu": cpu,
        "footprint": footprint,
        "profile": profile,
    }
    written = []
    for name, make in charts.items():
        figure = make(report)
        if figure is None:
            continue
        path = base.with_name(f"{base.name}-{name}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _title(report: dict[str, Any]) -> str:
    machine = report["machine"]
    return f"{report['date'][:16]} · {machine['cores']} cores · {machine['git_commit'][:8]}"


def concurrency(report: dict[str, Any]) -> Figure | None:
    sweep = report.get("api", {}).get("concurrency_sweep")
    if not sweep:
        return None
    figure, axis = plt.subplots(figsize=(7, 4.5))
    labels = {
        "submit": "taskdock submit (POST)",
        "poll": "taskdock poll (GET)",
        "hello": "hello-world GET (poll baseline)",
    }
    for name, points in sweep.items():
        xs = [point["connections"] for point in points]
        axis.plot(
            xs,
            [point["rate"] for point in points],
            marker="o",
            label=labels[name],
            color=COLOURS[name],
            linestyle="--" if name == "hello" else "-",
        )
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(xs, [str(x) for x in xs])
    axis.set_xlabel("wrk connections")
    axis.set_ylabel("requests per second (log)")
    axis.set_title(f"Throughput versus concurrency\n{_title(report)}", fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def latency(report: dict[str, Any]) -> Figure | None:
    sweep = report.get("api", {}).get("concurrency_sweep")
    redis = report.get("e2e", {}).get("redis", {})
    # Issue 13's point (100/s) where the run has it, else half the raw drain rate.
    dispatch = redis.get("latency_100") or redis.get("latency")
    panels = [panel for panel in (sweep, dispatch) if panel]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    column = 0
    if sweep:
        axis = axes[0][column]
        column += 1
        for name, points in sweep.items():
            xs = [point["connections"] for point in points]
            for percent, style in (("p50", "-"), ("p99", ":")):
                axis.plot(
                    xs,
                    [point["latency_ms"].get(percent) for point in points],
                    marker="o",
                    linestyle=style,
                    color=COLOURS[name],
                    label=f"{name} {percent}",
                )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel("wrk connections")
        axis.set_ylabel("ms (log)")
        axis.set_title("HTTP latency percentiles (wrk --latency)", fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    if dispatch:
        axis = axes[0][column]
        keys = ("p50", "p99")
        width = 0.35
        for offset, side, label in (
            (-width / 2, "taskdock", "taskdock (HTTP submit → start)"),
            (width / 2, "baseline", "raw Celery (.delay() → start)"),
        ):
            values = [dispatch[f"{side}_median_{key}"] for key in keys]
            bars = axis.bar(
                [i + offset for i in range(len(keys))],
                values,
                width,
                label=label,
                color=COLOURS[side],
            )
            axis.bar_label(bars, fmt="%.1f", fontsize=8)
        axis.set_xticks(range(len(keys)), keys)
        axis.set_yscale("log")
        top = max(
            dispatch[f"{side}_median_{key}"] for side in ("taskdock", "baseline") for key in keys
        )
        axis.set_ylim(top=top * 20)
        axis.set_ylabel("ms (log)")
        note = " (taskdock fell behind)" if dispatch.get("taskdock_fell_behind") else ""
        axis.set_title(f"Dispatch latency at {dispatch['offered_rate']:,.0f}/s{note}", fontsize=10)
        axis.grid(True, axis="y", which="both", alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    figure.suptitle(_title(report), fontsize=9)
    figure.tight_layout()
    return figure


def cpu(report: dict[str, Any]) -> Figure | None:
    summary = report.get("e2e", {}).get("redis", {}).get("cpu")
    if not summary:
        return None
    peers = summary.get("peers", {})
    bars = [("taskdock", summary["taskdock"]), ("raw Celery", summary["baseline"])] + [
        (textwrap.fill(PEERS[peer], 18), found["cpu_per_1000"]) for peer, found in peers.items()
    ]
    components = sorted({component for _, values in bars for component in values})
    figure, axis = plt.subplots(figsize=(7 + 1.5 * len(peers), 4.5))
    labels = [label for label, _ in bars]
    bottoms = [0.0] * len(bars)
    palette = plt.get_cmap("tab10")
    for index, component in enumerate(components):
        heights = [values.get(component, 0.0) for _, values in bars]
        axis.bar(labels, heights, bottom=bottoms, label=component, color=palette(index))
        bottoms = [b + v for b, v in zip(bottoms, heights, strict=True)]
    # Over each baseline: its total, and taskdock's total ÷ it.
    ratios = [None, summary["ratio"], *(found["ratio"] for found in peers.values())]
    for x, (total, ratio) in enumerate(zip(bottoms, ratios, strict=True)):
        text = f"{total:.2f} s" + ("" if ratio is None else f"\ntaskdock ÷ this: {ratio}")
        axis.text(x, total, text, ha="center", va="bottom", fontsize=8)
    axis.set_ylabel("CPU seconds per 1,000 tasks")
    axis.set_ylim(top=max(bottoms) * 1.2)
    axis.set_title(
        f"CPU per 1,000 tasks (Redis), ratio {summary['ratio']}\n{_title(report)}", fontsize=10
    )
    axis.legend()
    figure.tight_layout()
    return figure


def footprint(report: dict[str, Any]) -> Figure | None:
    load = report.get("footprint", {}).get("load")
    if not load or not load.get("samples"):
        return None
    samples = load["samples"]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    done = [sample["done"] for sample in samples]
    for key, label in (
        ("api_rss", "API RSS"),
        ("worker_rss", "worker RSS (main + pool)"),
        ("worker_pss", "worker PSS (main + pool)"),
        ("worker_main_rss", "worker main process RSS"),
    ):
        if key in samples[0]:
            axis.plot(done, [sample[key] / 2**20 for sample in samples], marker=".", label=label)
    axis.set_xlabel("tasks completed")
    axis.set_ylabel("MB")
    axis.set_ylim(bottom=0)
    axis.set_title(f"Memory over {load['tasks_done']:,} tasks\n{_title(report)}", fontsize=10)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def profile(report: dict[str, Any]) -> Figure | None:
    """CPU per request, split by layer as py-spy's self time splits it."""
    data = report.get("profile")
    if not data:
        return None
    names = [name for name in PROFILED if name in data]
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(names), 5))
    labels = [PROFILED[name] for name in names] + ["raw send_task"]
    bottoms = [0.0] * len(labels)
    palette = plt.get_cmap("tab20")
    for index, layer in enumerate(layers_seen(data)):
        values = [
            data[name]["cpu_ms_per_request"]
            * data[name].get("profile", {}).get("layers", {}).get(layer, 0.0)
            for name in names
        ] + [0.0]
        axis.bar(labels, values, bottom=bottoms, label=layer, color=palette(index % 20))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    raw = data["raw_send_task"]["cpu_ms_per_message"]
    axis.bar(labels[-1], raw, bottom=0.0, color="#7f7f7f", label="raw send_task (one thread)")
    bottoms[-1] = raw
    for x, total in enumerate(bottoms):
        axis.text(x, total, f"{total:.2f} ms", ha="center", va="bottom")
    axis.set_ylabel("CPU ms per request (one core)")
    axis.set_title(f"Where a request's CPU goes (py-spy, self time)\n{_title(report)}", fontsize=10)
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    return figure
