"""Every benchmark, each against its baseline: `make bench` (`make bench ARGS=--quick`).

    python -m bench.run [--quick] [--only MODULE ...] [--rounds N] [--seconds S]

MODULE: api, e2e, pg, footprint, profile, purge, console, dev.

Writes bench/results/<date>-<name>.json (every round, machine info), a Markdown summary and
PNG charts beside it. See bench/README.md for what each metric is and how it is measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from types import ModuleType
from typing import Any

from bench import (
    bench_api,
    bench_console,
    bench_dev,
    bench_e2e,
    bench_footprint,
    bench_pg,
    bench_profile,
    bench_purge,
    charts,
)
from bench.bench_e2e import PEERS
from bench.bench_profile import PROFILED, WORKER_PROFILES, layers_seen
from bench.common import RESULTS, Options, console, fmt, machine_info, now_stamp, ui, write_json

MODULES: dict[str, ModuleType] = {
    "api": bench_api,
    "e2e": bench_e2e,
    "pg": bench_pg,
    "footprint": bench_footprint,
    "profile": bench_profile,
    "purge": bench_purge,
    "console": bench_console,
    "dev": bench_dev,
}
TOOLS = {"wrk": "wrk", "redis-server": "redis-server", "pgbench": "postgresql-client"}


def parse(argv: list[str]) -> tuple[Options, list[str], str]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds, short runs, small N")
    parser.add_argument("--only", action="append", choices=sorted(MODULES), default=None)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seconds", type=float, help="length of one wrk round")
    parser.add_argument("--connections", type=int, help="wrk connections (and pgbench clients)")
    parser.add_argument("--footprint-tasks", type=int)
    parser.add_argument("--no-rabbitmq", action="store_true")
    parser.add_argument("--name", help="results file name (default: the modules run)")
    args = parser.parse_args(argv)
    options = Options.quick_run() if args.quick else Options()
    overrides: dict[str, Any] = {
        "rounds": args.rounds,
        "seconds": args.seconds,
        "connections": args.connections,
        "footprint_tasks": args.footprint_tasks,
    }
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_rabbitmq:
        options = replace(options, rabbitmq=False)
    only = args.only or list(MODULES)
    name = args.name or ("all" if args.only is None else "-".join(only))
    if args.quick and not args.name:
        name += "-quick"
    return options, only, name


def main(argv: list[str]) -> int:
    options, only, name = parse(argv)
    missing = [
        f"{tool} (Debian package {package})"
        for tool, package in TOOLS.items()
        if shutil.which(tool) is None
    ]
    if missing:
        print("missing: " + ", ".join(missing), file=sys.stderr)
        return 2
    estimates = {module: MODULES[module].estimate(options) for module in only}
    expected = sum(estimates.values())
    console.print(
        f"[bold]taskdock benchmarks[/bold]: {', '.join(only)}; expected about "
        f"{expected / 60:.0f} min ({', '.join(f'{m} ~{s / 60:.1f}' for m, s in estimates.items())})"
        + (" [quick]" if options.quick else "")
    )
    report: dict[str, Any] = {
        "date": now_stamp().isoformat(timespec="seconds"),
        "name": name,
        "machine": machine_info(),
        "options": asdict(options),
        "expected_seconds": round(expected),
    }
    started = time.monotonic()
    with ui.progress:
        overall = ui.task("[bold]all benchmarks[/bold]", len(only))
        for module in only:
            module_started = time.monotonic()
            report[module] = MODULES[module].run(options)
            report.setdefault("durations", {})[module] = round(time.monotonic() - module_started)
            ui.advance(overall)
    report["duration_seconds"] = round(time.monotonic() - started)

    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"{report['date'][:10]}-{name}"
    write_json(base.with_suffix(".json"), report)
    images = charts.draw(report, base)
    markdown = summary(report, [image.name for image in images])
    base.with_suffix(".md").write_text(markdown)
    print(markdown)
    console.print(f"written: {base}.json, {base}.md, {len(images)} charts")
    return 0


def _ratio_row(label: str, result: dict[str, Any], target: str, unit: str, key: str = "") -> str:
    suffix = f"_{key}" if key else ""
    return (
        f"| {label} | {fmt(result[f'taskdock_median{suffix}'])} {unit} | "
        f"{fmt(result[f'baseline_median{suffix}'])} {unit} | {fmt(result[f'ratio{suffix}'])} | "
        f"{target} |"
    )


def _peer_rows(
    number: str,
    label: str,
    taskdock: float,
    peers: dict[str, dict[str, Any]],
    value: str,
    unit: str,
) -> list[str]:
    """One row per peer: taskdock's median, the peer's `value` and taskdock ÷ the peer."""
    return [
        f"| {number}. {label} (vs {PEERS[peer]}) | {fmt(taskdock)} {unit} | "
        f"{fmt(found[value])} {unit} | {fmt(found['ratio'])} | "
        f"{PEER_TARGETS.get((number, peer), '')} |"
        for peer, found in peers.items()
    ]


def summary(report: dict[str, Any], images: list[str]) -> str:
    machine = report["machine"]
    lines = [
        f"# Benchmarks, {report['date']} ({report['name']})",
        "",
        f"{machine['cpu_model']}, {machine['cores']} cores, Linux {machine['kernel']}, "
        f"Python {machine['python']}, "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + f"; commit {machine['git_commit'][:10]}"
        + (" (app/ modified)" if machine["app_modified_since_commit"] else "")
        + f". {report['options']['rounds']} rounds per metric"
        + (" (--quick)" if report["options"]["quick"] else "")
        + f"; took {report['duration_seconds'] / 60:.1f} min.",
        "",
        "| metric | taskdock (median) | baseline (median) | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows: list[tuple[str, Callable[[dict[str, Any]], list[str]]]] = [
        ("api", _api_rows),
        ("e2e", _e2e_rows),
        ("pg", _pg_rows),
        ("purge", _purge_rows),
        ("dev", _dev_rows),
    ]
    for module, make in rows:
        if module in report:
            lines += make(report[module])
    if "footprint" in report:
        lines += ["", *_footprint_lines(report["footprint"])]
    if "console" in report:
        lines += ["", *_console_lines(report["console"])]
    if "profile" in report:
        lines += ["", *_profile_lines(report["profile"])]
    notes = _notes(report)
    if notes:
        lines += ["", "Notes:", *[f"- {note}" for note in notes]]
    if images:
        lines += ["", *[f"![{image}]({image})" for image in images]]
    lines += ["", "Baselines and method: bench/README.md. Command: `make bench`.", ""]
    return "\n".join(lines)


def _api_rows(api: dict[str, Any]) -> list[str]:
    submit = api["submit_efficiency"]
    rows = [_ratio_row("1. submit efficiency (vs raw send_task)", submit, ">= 1.0", "/s")]
    submit_floor = submit.get("peers", {}).get("fastapi_group_commit_floor")
    if submit_floor:
        # The minimal prototype: what FastAPI + psycopg + kombu allow, and what taskdock adds.
        raw = submit["baseline_median"]
        rows += [
            f"| 1c. submit's floor: a bare FastAPI POST, group commit, one Redis pipeline per "
            f"batch (vs raw send_task) | {fmt(submit_floor['median'])} /s | {fmt(raw)} /s | "
            f"{fmt(submit_floor['median'] / raw)} | |",
            f"| 1d. submit (vs that floor) | {fmt(submit['taskdock_median'])} /s | "
            f"{fmt(submit_floor['median'])} /s | {fmt(submit_floor['ratio'])} | |",
        ]
    if "submit_efficiency_outbox" in api:
        rows.append(
            _ratio_row(
                "1b. submit efficiency, the dispatcher publishing (vs raw send_task)",
                api["submit_efficiency_outbox"],
                ">= 1.0",
                "/s",
            )
        )
    poll = api["poll_efficiency"]
    rows.append(_ratio_row("4. poll efficiency (vs hello-world GET)", poll, ">= 0.45", "/s"))
    floor = poll.get("peers", {}).get("fastapi_psycopg_floor")
    if floor:
        # The minimal prototype: what FastAPI + psycopg allow, and what taskdock adds to it.
        hello = poll["baseline_median"]
        rows += [
            f"| 4b. poll's floor: a bare FastAPI + psycopg GET by id (vs hello-world GET) | "
            f"{fmt(floor['median'])} /s | {fmt(hello)} /s | {fmt(floor['median'] / hello)} | |",
            f"| 4c. poll (vs that floor) | {fmt(poll['taskdock_median'])} /s | "
            f"{fmt(floor['median'])} /s | {fmt(floor['ratio'])} | |",
        ]
    return rows


# The suites of metric 2, with how each is named in the summary.
SUITES = {
    "redis": "redis",
    "rabbitmq": "rabbitmq",
    "redis_outbox": "redis, the dispatcher publishing",
}
# (metric, peer): taskdock, which also makes submission durable, should beat the SQL backend.
PEER_TARGETS = {("2", "celery_sql_backend"): "> 1", ("5", "celery_sql_backend"): "< 1"}


def _e2e_rows(e2e: dict[str, Any]) -> list[str]:
    rows = []
    for suite_name, label in SUITES.items():
        suite = e2e.get(suite_name, {})
        if "throughput" in suite:
            rows.append(
                _ratio_row(
                    f"2. end-to-end throughput, {label} (vs raw drain)",
                    suite["throughput"],
                    ">= 0.5" if suite_name == "rabbitmq" else ">= 0.6",
                    "/s",
                )
            )
            rows += _peer_rows(
                "2",
                f"end-to-end throughput, {label}",
                suite["throughput"]["taskdock_median"],
                suite["throughput"].get("peers", {}),
                "median",
                "/s",
            )
            raw = suite["throughput"]["baseline_median"]
            for number, peer, what in (
                # The prototypes' own ratios: what two round trips per task leave of the drain,
                # and what is left once the submissions are served and recorded too.
                ("2b", "celery_two_writes", "the minimal prototype itself"),
                ("2c", "e2e_floor", "end-to-end's floor itself"),
            ):
                floor = suite["throughput"].get("peers", {}).get(peer)
                if floor:
                    rows.append(
                        f"| {number}. {what}, {label} (vs raw drain) | {fmt(floor['median'])} /s"
                        f" | {fmt(raw)} /s | {fmt(floor['median'] / raw)} | |"
                    )
    for suite_name in ("redis", "redis_outbox"):
        for field, target in (
            ("latency_100", "<= 2 (p50), <= 4 (p99)"),
            ("latency", ""),
            ("latency_unloaded", ""),
        ):
            latency = e2e.get(suite_name, {}).get(field)
            if not latency:
                continue
            at = f"at {latency['offered_rate']:,.0f}/s"
            if suite_name != "redis":
                at += f", {SUITES[suite_name]}"
            floor = latency.get("peers", {}).get("e2e_floor")
            for key in ("p50", "p99"):
                rows.append(
                    _ratio_row(
                        f"3. dispatch latency {key} {at} (vs .delay())",
                        latency,
                        target.split(", ")[0 if key == "p50" else 1] if target else "",
                        "ms",
                        key,
                    )
                )
                if floor:
                    delay = latency[f"baseline_median_{key}"]
                    rows += [
                        f"| 3c. end-to-end's floor, {key} {at} (vs .delay()) | "
                        f"{fmt(floor[f'median_{key}'])} ms | {fmt(delay)} ms | "
                        f"{fmt(floor[f'median_{key}'] / delay)} | |",
                        f"| 3d. dispatch latency {key} {at} (vs end-to-end's floor) | "
                        f"{fmt(latency[f'taskdock_median_{key}'])} ms | "
                        f"{fmt(floor[f'median_{key}'])} ms | {fmt(floor[f'ratio_{key}'])} | |",
                    ]
    for suite_name in ("redis", "redis_outbox"):
        cpu = e2e.get(suite_name, {}).get("cpu")
        if cpu:
            rows.append(
                f"| 5. CPU per 1,000 tasks, {SUITES[suite_name]} (vs raw Celery) | "
                f"{fmt(cpu['taskdock_total'])} s | {fmt(cpu['baseline_total'])} s | "
                f"{fmt(cpu['ratio'])} | <= 1.6 |"
            )
            rows += _peer_rows(
                "5",
                f"CPU per 1,000 tasks, {SUITES[suite_name]}",
                cpu["taskdock_total"],
                cpu.get("peers", {}),
                "total",
                "s",
            )
    return rows


def _pg_rows(pg: dict[str, Any]) -> list[str]:
    return [
        _ratio_row(
            f"6. submit rate / pgbench insert ceiling ({pg['clients']} clients)", pg, "", "/s"
        )
    ]


def _purge_rows(purge: dict[str, Any]) -> list[str]:
    label = f"8. poll during a purge of {purge['rows']:,} records (vs no purge)"
    return [
        _ratio_row(f"{label}, rate", purge, "", "/s"),
        _ratio_row(f"{label}, p50", purge, "", " ms", key="p50_ms"),
        _ratio_row(f"{label}, p99", purge, "", " ms", key="p99_ms"),
    ]


def _dev_rows(dev: dict[str, Any]) -> list[str]:
    """Metric 10: the laptop mode's rates against the server stack's, and what went wrong."""
    label = (
        f"10. taskdock dev (SQLite), {dev['tasks_per_round']:,} submissions at "
        f"{dev['connections']} connections (vs the PostgreSQL + Redis stack)"
    )
    faults = (
        f"{dev['taskdock_not_succeeded']} not SUCCEEDED, {dev['taskdock_status_5xx']} 5xx, "
        f"{dev['taskdock_not_202']} not 202 over all rounds"
    )
    return [
        _ratio_row(f"{label}, end-to-end", dev, "report the rate", "/s"),
        _ratio_row(f"{label}, submissions", dev, faults, "/s", key="submit_rate"),
    ]


def _console_lines(console: dict[str, Any]) -> list[str]:
    """Server time of each console page on a large table, against the issue's bound."""
    bound = console["bound_ms"]
    return [
        f"| 9. console page, {console['rows']:,} tasks | median ms | p90 ms | "
        f"under {bound:.0f} ms |",
        "| --- | --- | --- | --- |",
        *(
            f"| `{page}` | {fmt(found['median_ms'])} | {fmt(found['p90_ms'])} | "
            f"{'yes' if found['median_ms'] < bound else 'NO'} |"
            for page, found in console["pages"].items()
        ),
    ]


def _footprint_lines(footprint: dict[str, Any]) -> list[str]:
    api, worker, load = footprint["api"], footprint["worker"], footprint["load"]
    return [
        "| 7. footprint | API | worker (main + pool) |",
        "| --- | --- | --- |",
        f"| seconds from start to ready | {api['ready_seconds_median']} | "
        f"{worker['ready_seconds_median']} |",
        f"| idle RSS / PSS, MB | {api['idle_rss_mb']} / {api['idle_pss_mb']} | "
        f"{worker['idle_rss_mb']} / {worker['idle_pss_mb']} ({worker['processes']} processes) |",
        f"| RSS after {load['tasks_done']:,} tasks (max), MB | {load['api_rss_mb']['after']} "
        f"({load['api_rss_mb']['max']}) | {load['worker_rss_mb']['after']} "
        f"({load['worker_rss_mb']['max']}) |",
        f"| RSS growth over the second half, MB per 1,000 tasks | "
        f"{fmt(load['api_rss_mb_per_1000_tasks_second_half'])} | "
        f"{fmt(load['worker_rss_mb_per_1000_tasks_second_half'])} |",
    ]


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    """What bounds metrics 1 and 4: CPU per request, and where py-spy saw it go."""
    raw = profile["raw_send_task"]
    servers = [name for name in PROFILED if name in profile]
    lines = [
        f"What bounds metrics 1 and 4 (py-spy at {profile['rate_hz']} Hz on the API process, "
        f"wrk with {profile['connections']} connections; raw `send_task` costs "
        f"{fmt(raw['cpu_ms_per_message'])} ms of CPU per message at {fmt(raw['rate'])}/s):",
        "",
        *_head("CPU per request", [PROFILED[name] for name in servers]),
        "| ms of one core | "
        + " | ".join(fmt(profile[name]["cpu_ms_per_request"]) for name in servers)
        + " |",
        "| requests/s under the profiler | "
        + " | ".join(fmt(profile[name]["rate"]) for name in servers)
        + " |",
    ]
    lines += _layer_rows(layers_seen(profile), [profile[name] for name in servers])
    for name in servers:
        if name == "hello":
            continue
        lines += _function_lines(PROFILED[name], profile[name].get("profile", {}))
        error = profile[name].get("profile_error")
        if error:
            lines += ["", f"{name}: no profile ({error.strip().splitlines()[-1]})"]
    worker_lines = _worker_profile_lines(profile)
    if worker_lines:
        lines += ["", *worker_lines]
    return lines


def _head(first: str, columns: Iterable[str]) -> list[str]:
    names = list(columns)
    return [f"| {first} | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]


def _layer_rows(layers: list[str], columns: list[dict[str, Any]]) -> list[str]:
    """A row per layer: its share of each column's samples (self time)."""
    rows = []
    for layer in layers:
        shares = [column.get("profile", {}).get("layers", {}).get(layer) for column in columns]
        rows.append(
            f"| {layer}, share of samples (self) | "
            + " | ".join("" if share is None else f"{100 * share:.0f}%" for share in shares)
            + " |"
        )
    return rows


def _function_lines(name: str, found: dict[str, Any]) -> list[str]:
    """The functions a profile spent most in: taskdock's (inclusive) and any (self)."""
    lines: list[str] = []
    for key, what in (
        ("taskdock_inclusive", "taskdock's functions (inclusive share of samples)"),
        ("top_self", "the most self time"),
    ):
        if found.get(key):
            lines += [
                "",
                f"{name}, {what}: "
                + ", ".join(
                    f"`{function}` {100 * share:.0f}%"
                    for function, share in list(found[key].items())[:10]
                ),
            ]
    return lines


WORKER_SIDES = {
    "api": "API (took the submissions)",
    "consumer": "Celery consumer (prefork parent)",
    "pool": "pool children (the runs)",
}


def _worker_label(key: str) -> str:
    broker, floor = WORKER_PROFILES[key]
    return f"{'end-to-end floor' if floor else 'taskdock'}, {broker}"


def _worker_profile_lines(profile: dict[str, Any]) -> list[str]:
    """Where the CPU of a task goes on its way through the API, a consumer and a pool child:
    taskdock's beside end-to-end floor's, on each broker."""
    found = {key: profile[key] for key in WORKER_PROFILES if key in profile}
    if not found:
        return []
    pools = {worker["pool_processes"] for worker in found.values()}
    lines = [
        f"What bounds metrics 2, 3 and 5 (py-spy at {profile['rate_hz']} Hz on the API, on a "
        f"worker's Celery consumer and on each of its {', '.join(map(str, sorted(pools)))} "
        "pool processes, through one submit round of no-op tasks until all had finished; the "
        "end-to-end floor is bench.e2e_floor):",
        "",
        "| CPU per task, ms of one core | tasks | "
        + " | ".join(WORKER_SIDES.values())
        + " | total |",
        "| --- | --- |" + " --- |" * (len(WORKER_SIDES) + 1),
    ]
    for key, worker in found.items():
        per_task = worker["cpu_ms_per_task"]
        lines.append(
            f"| {_worker_label(key)} | {worker['tasks']:,} | "
            + " | ".join(fmt(per_task.get(side)) for side in WORKER_SIDES)
            + f" | {fmt(sum(per_task.get(side, 0.0) for side in WORKER_SIDES))} |"
        )
    for key, worker in found.items():
        columns = [{"profile": worker.get(side, {})} for side in WORKER_SIDES]
        layers: list[str] = []
        for column in columns:
            layers += [
                layer for layer in column["profile"].get("layers", {}) if layer not in layers
            ]
        lines += [
            "",
            *_head(_worker_label(key), WORKER_SIDES.values()),
            *_layer_rows(layers, columns),
        ]
        for side, label in WORKER_SIDES.items():
            lines += _function_lines(f"{_worker_label(key)}, {label}", worker.get(side, {}))
        if worker.get("profile_error"):
            lines += ["", f"{_worker_label(key)}: no profile ({worker['profile_error']})"]
    return lines


def _notes(report: dict[str, Any]) -> list[str]:
    notes = []
    redis = report.get("e2e", {}).get("redis", {})
    latency = redis.get("latency")
    if latency and latency.get("taskdock_fell_behind"):
        notes.append(
            "dispatch latency: taskdock could not take the offered rate (half the raw drain "
            "rate); its load generator fell behind and stopped early, so its latencies are "
            "queueing under overload."
        )
    elif latency and latency["offered_rate"] > redis["throughput"]["taskdock_median"]:
        notes.append(
            f"dispatch latency: the offered rate ({latency['offered_rate']:,.0f}/s, half the "
            f"raw drain rate) is above taskdock's end-to-end throughput "
            f"({redis['throughput']['taskdock_median']:,.0f}/s), so its latencies include "
            "queueing behind a growing backlog."
        )
    rabbit = report.get("e2e", {}).get("rabbitmq", {})
    if "skipped" in rabbit:
        notes.append(f"RabbitMQ skipped: {rabbit['skipped']}.")
    load = report.get("footprint", {}).get("load")
    if load and load["capped_by_time"]:
        notes.append(
            f"footprint: the time cap stopped the load at {load['tasks_done']:,} of "
            f"{load['tasks_target']:,} tasks."
        )
    repeated = sum(run["repeats"] for section in _all_round_sets(report) for run in section)
    if repeated:
        notes.append(f"{repeated} round(s) repeated for CPU steal above 20%.")
    return notes


def _all_round_sets(report: dict[str, Any]) -> list[list[dict[str, Any]]]:
    found: list[list[dict[str, Any]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("rounds"), list):
                found.append(node["rounds"])
            for value in node.values():
                walk(value)

    walk(report)
    return found


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
