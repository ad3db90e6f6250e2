"""The run's reports: all figures as JSON, a Markdown summary, and a memory chart."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.chaos.faults import KINDS, FaultWindow

logger = logging.getLogger(__name__)

COLOURS = ["#e41a1c", "#377eb8", "#4daf4a", "#984ea3", "#ff7f00", "#a65628", "#f781bf"]


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


def write_reports(
    report: dict[str, Any], directory: Path, memory: list[Any], *, name: str = "chaos"
) -> list[Path]:
    """<date>-<name>.json, <date>-<name>.md and, if matplotlib is there,
    <date>-<name>-memory.png."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{datetime.now(UTC):%Y-%m-%d}-{name}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(report))
    chart = Path(f"{stem}-memory.png")
    if memory_chart(memory, report["fault_windows"], report["started_at"], chart):
        paths.append(chart)
    return paths


def markdown(report: dict[str, Any]) -> str:
    check = report["check"]
    reruns = check["run_more_than_once"]
    latency = check["submit_latency_outside_faults"]
    finish = check["time_to_finish"]
    rows = [
        ("duration (load)", f"{report['settings']['seconds']} s at {report['settings']['rate']}/s"),
        ("faults injected", _fault_counts(report["fault_windows"])),
        ("submitted", check["submitted"]),
        ("accepted (202)", check["accepted"]),
        ("rejected", f"{check['rejected']} {check['rejected_by_status']}"),
        ("indeterminate", f"{check['indeterminate']} ({check['indeterminate_recorded']} recorded)"),
        ("completed", check["completed"]),
        ("failed", f"{check['failed']} {check['failed_errors']}"),
        ("**lost**", f"**{check['lost']}**"),
        ("**unexpected**", f"**{check['unexpected']}**"),
        ("run more than once", f"{reruns['tasks']} tasks {reruns['by_fault']}"),
        ("overlapping executions", check["overlapping_executions"]),
        (
            "submit p50 / p99 outside faults",
            f"{latency.get('p50_ms')} / {latency.get('p99_ms')} ms",
        ),
        (
            "time to finish p50 / p99 / max",
            f"{finish.get('p50_s')} / {finish.get('p99_s')} / {finish.get('max_s')} s",
        ),
        ("stale deliveries skipped", report["stale_deliveries_skipped"]),
        ("processes that died on their own", _exits(report)),
        ("drained in", f"{report['drain_seconds']} s"),
    ]
    memory = [
        f"| {name} | {m['start_mib']} | {m['end_mib']} | {m['max_mib']} |"
        for name, m in sorted(report["memory"].items())
    ]
    return "\n".join(
        [
            f"# Soak and chaos run, {report['started_at_iso']}",
            "",
            "| figure | value |",
            "| --- | --- |",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            "| process (RSS with children, MiB) | start | end | max |",
            "| --- | --- | --- | --- |",
            *memory,
            "",
            f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}. "
            "Command: `make chaos` (CHAOS_SECONDS sets the duration).",
            "",
        ]
    )


def _exits(report: dict[str, Any]) -> str:
    exits = report["unexpected_exits"]
    where = ", ".join(
        f"{e['name']} at {e['at'] - report['started_at']:.0f}s (exit {e['returncode']})"
        for e in exits
    )
    return f"{len(exits)} {where}".strip()


def _fault_counts(windows: list[dict[str, Any]]) -> str:
    counts = {kind: sum(window["kind"] == kind for window in windows) for kind in KINDS}
    return ", ".join(f"{kind} {count}" for kind, count in counts.items())


def memory_chart(
    samples: list[tuple[float, dict[str, int]]],
    windows: list[dict[str, Any]],
    origin: float,
    path: Path,
) -> bool:
    """RSS over time per process, fault windows shaded; False when it cannot be drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("no memory chart: matplotlib is not installed")
        return False
    figure, axes = plt.subplots(figsize=(11, 5.5))
    names = sorted({name for _, sample in samples for name in sample})
    times = [at - origin for at, _ in samples]
    for name in names:
        # NaN while a process is down, so its line breaks instead of bridging the outage.
        values = [s[name] / 2**20 if s.get(name) else math.nan for _, s in samples]
        axes.plot(times, values, label=name, linewidth=1.2)
    colours = dict(zip(KINDS, COLOURS, strict=False))
    shown: set[str] = set()
    for window in windows:
        kind = window["kind"]
        axes.axvspan(
            window["started"] - origin,
            max(window["ended"] - origin, window["started"] - origin + 0.5),
            color=colours.get(kind, "grey"),
            alpha=0.25,
            label=None if kind in shown else kind,
        )
        shown.add(kind)
    axes.set_xlabel("seconds since start")
    axes.set_ylabel("RSS with children (MiB)")
    axes.set_title("taskdock memory under chaos (shaded: fault windows)")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", ncol=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def windows_as_dicts(windows: list[FaultWindow], origin: float) -> list[dict[str, Any]]:
    return [
        {
            "kind": window.kind,
            "started": window.started,
            "ended": window.ended,
            "offset_s": round(window.started - origin, 1),
            "duration_s": round(window.ended - window.started, 2),
            "detail": window.detail,
        }
        for window in windows
    ]
