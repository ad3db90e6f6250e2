"""Metric 10: `taskdock dev`, the laptop mode (SQLite and the filesystem broker), under load.

Each round sends Options.dev_tasks `bench.noop` submissions over Options.connections
connections (closed loop: each connection posts again once answered), then waits until every
task it made has finished. Reported: the submission rate, the end-to-end rate (tasks ÷ last
`finished_at` - first `created_at`), how many answers were not 202 and how many were 5xx,
how many tasks ended other than SUCCEEDED, and the CPU per 1,000 tasks of everything `taskdock
dev` runs (its API, worker with its pool and dispatcher).

`taskdock dev` runs as a user runs it (migrations, the API, a worker and the dispatcher, each a
process of its own, in a data directory of its own), but with the rate limits too high to
refuse anything and no unfinished-task quota, as in every benchmark: its defaults (100
submissions a minute, 1,000 unfinished) would refuse most of the load with 429, by design.
The baseline is the same load, in alternating rounds, against taskdock on PostgreSQL and Redis
(the API, one worker, the dispatcher): what the laptop mode costs against the server stack.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.bench_e2e import NOOP_BODY, cpu_groups
from bench.common import (
    AUTH,
    UNLIMITED,
    Bench,
    CpuMeter,
    Options,
    bench_world,
    rounds,
    ui,
    unconfigured_env,
    wait_for,
)

FINISH_TIMEOUT = 600.0
# The outcome of the tasks a round made, on either database: SQLite keeps its timestamps as
# naive UTC text, which compares as time.
OUTCOME = (
    "SELECT count(*), sum(CASE WHEN status = 'SUCCEEDED' THEN 1 ELSE 0 END),"
    " sum(CASE WHEN status IN ('SUCCEEDED', 'FAILED', 'CANCELLED') THEN 0 ELSE 1 END),"
    " min(created_at), max(finished_at) FROM task WHERE type = 'bench.noop'"
    " AND (:before IS NULL OR created_at > :before)"
)
LAST_CREATED = "SELECT max(created_at) FROM task"


def estimate(options: Options) -> float:
    """Seconds: start-ups, then per round both sides at about 150 submissions/s, drained."""
    return 60 + options.rounds * 2 * (options.dev_tasks / 150 + 10)


@dataclass
class Side:
    """One side of the rounds: where it takes submissions, how its database is read, whose
    CPU counts."""

    url: str
    query: Callable[..., Any]  # (sql, params) -> the first row
    groups: dict[str, Callable[[], Iterable[int]]]


async def _burst(url: str, count: int, connections: int) -> tuple[float, Counter[int]]:
    """`count` POSTs over `connections` connections; seconds taken and the answers' statuses."""
    statuses: Counter[int] = Counter()
    left = count
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)

    async def one_connection(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                response = await client.post(url, json=NOOP_BODY)
                statuses[response.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1  # no answer at all

    async with httpx.AsyncClient(limits=limits, timeout=30, headers=AUTH) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one_connection(client) for _ in range(connections)))
        return time.perf_counter() - started, statuses


def _moment(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def load_round(side: Side, options: Options) -> dict[str, Any]:
    before = side.query(LAST_CREATED, {})[0]
    meter = CpuMeter(side.groups).start()
    seconds, statuses = asyncio.run(_burst(side.url, options.dev_tasks, options.connections))
    accepted = statuses.get(202, 0)

    def finished() -> bool:
        made, _, unfinished, _, _ = side.query(OUTCOME, {"before": before})
        return bool(made >= accepted and not unfinished)

    wait_for(finished, timeout=FINISH_TIMEOUT, what="the round's tasks to finish", every=0.2)
    cpu = meter.stop()
    made, succeeded, _, first, last = side.query(OUTCOME, {"before": before})
    span = (_moment(last) - _moment(first)).total_seconds()
    return {
        "value": made / span,
        "submit_rate": options.dev_tasks / seconds,
        "tasks": made,
        "not_succeeded": made - (succeeded or 0),
        "not_202": options.dev_tasks - accepted,
        "status_5xx": sum(n for status, n in statuses.items() if status >= 500),
        "no_answer": statuses.get(0, 0),
        "statuses": {str(status): n for status, n in sorted(statuses.items())},
        "cpu_per_1000_total": round(sum(cpu.values()) / max(made, 1) * 1000, 4),
    }


def dev_env(data: Path) -> dict[str, str]:
    """A shell's environment with no taskdock setting, plus what every benchmark sets."""
    return {**unconfigured_env(), **UNLIMITED, "TASKDOCK_DATA_DIR": str(data)}


def sqlite_query(path: Path) -> Callable[..., Any]:
    def query(sql: str, params: dict[str, Any]) -> Any:
        # Read-only, and a connection per read: the writers are other processes.
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as connection:
            return connection.execute(sql, params).fetchone()

    return query


def pg_query(bench: Bench) -> Callable[..., Any]:
    def query(sql: str, params: dict[str, Any]) -> Any:
        sql = sql.replace(":before IS NULL", "CAST(:before AS timestamptz) IS NULL")
        return bench.row(sql, **params)

    return query


def run(options: Options) -> dict[str, Any]:
    with bench_world("dev") as bench:
        data = bench.work / "dev-data"
        # Migrations first, then its API, worker and dispatcher: slower to be ready than an API.
        dev, base = bench.api(dev_env(data), name="dev", command="dev", timeout=120)
        laptop = Side(f"{base}/api/v1/tasks", sqlite_query(data / "taskdock.db"), {"dev": dev.tree})
        env = bench.env()
        api, api_base = bench.api(env)
        worker = bench.worker(env, options.concurrency)
        dispatcher = bench.dispatcher(env)
        server = Side(
            f"{api_base}/api/v1/tasks",
            pg_query(bench),
            cpu_groups(bench, local_broker=True, api=api, worker=worker, dispatcher=dispatcher),
        )
        ui.log(
            f"[bold]metric 10: taskdock dev (SQLite), {options.dev_tasks:,} submissions at "
            f"{options.connections} connections[/bold]"
        )
        result = rounds(
            "taskdock dev",
            lambda: load_round(laptop, options),
            lambda: load_round(server, options),
            options.rounds,
            keys=("value", "submit_rate"),
        )
        result["tasks_per_round"] = options.dev_tasks
        result["connections"] = options.connections
        for key in ("not_succeeded", "not_202", "status_5xx", "no_answer"):
            result[f"taskdock_{key}"] = sum(run["taskdock"][key] for run in result["rounds"])
        return result
