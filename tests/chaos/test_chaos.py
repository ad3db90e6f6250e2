"""Soak and chaos: a steady load while faults are injected; nothing accepted may be lost.

`make chaos` runs it (CHAOS_SECONDS, default 600). Everything it faults is its own: a
PostgreSQL cluster and a redis-server on free ports, and taskdock's processes. The check
compares the client's log with the task records and with a ledger the tasks write.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.chaos.checker import TERMINAL, Execution, TaskRow, check
from tests.chaos.faults import KINDS, FaultWindow, run_faults
from tests.chaos.load import INDETERMINATE, REJECTED, Load, Request
from tests.chaos.memory import MemorySampler
from tests.chaos.report import machine, windows_as_dicts, write_reports
from tests.chaos.system import ChaosSystem
from tests.chaos.tasks import LEDGER_DDL, LEDGER_DSN_ENV
from tests.support.services import PostgresServer, RedisServer, free_port, private_postgres
from tests.support.stack import ROOT, Stack, base_env, running_stack, taskdock

SECONDS = float(os.environ.get("CHAOS_SECONDS", "600"))
# Below what the two workers finish here (about 16/s with 50-300 ms tasks on 2 busy cores):
# a backlog should come from the faults, not from a load the system could never keep up with.
RATE = float(os.environ.get("CHAOS_RATE", "10"))
# Each task sleeps this many milliseconds ("low-high"); CHAOS_KEYS=0 submits without an
# Idempotency-Key, so submissions take the group commit and the batched publish.
SLEEP_MS = tuple(int(part) for part in os.environ.get("CHAOS_SLEEP_MS", "50-300").split("-"))
KEYS = os.environ.get("CHAOS_KEYS", "1") != "0"
# The reports' name: <date>-<NAME>.md and .json beside the benchmarks' results.
NAME = os.environ.get("CHAOS_NAME", "chaos")
FAULT_INTERVAL = float(os.environ.get("CHAOS_FAULT_INTERVAL", "12"))
# Three leases: the stopped worker's runs are surely handed to another worker meanwhile.
STOP_SECONDS = float(os.environ.get("CHAOS_STOP_SECONDS", "10"))
DRAIN_SECONDS = float(os.environ.get("CHAOS_DRAIN_SECONDS", "180"))
RESULTS_DIR = Path(os.environ.get("CHAOS_RESULTS_DIR", str(ROOT / "bench" / "results")))
# Start-up, the drain and the reports come on top of the run itself.
TIMEOUT = int(SECONDS + DRAIN_SECONDS + 600)

pytestmark = pytest.mark.chaos


@dataclass
class Soak:
    started: float
    windows: list[FaultWindow]
    requests: list[Request]
    drain_seconds: float
    sampler: MemorySampler


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[PostgresServer, RedisServer]]:
    """A private PostgreSQL cluster and redis-server: the only servers the run may fault."""
    broker = RedisServer(tmp_path / "redis")
    with private_postgres() as postgres:
        try:
            broker.start()
            yield postgres, broker
        finally:
            broker.stop()


def chaos_env(
    data_dir: Path, database_url: str, ledger_dsn: str, broker_url: str
) -> dict[str, str]:
    return base_env(
        data_dir,
        TASKDOCK_DATABASE_URL=database_url,
        TASKDOCK_BROKER_URL=broker_url,
        TASKDOCK_TASK_MODULES="tests.chaos.tasks",
        # Messages lost with the broker's data are sent again within the run, not in 5 minutes.
        TASKDOCK_REPUBLISH_AFTER_SECONDS="15",
        # Redis's visibility timeout follows the longest time limit: keep it near a minute.
        TASKDOCK_TASK_DEFAULT_TIME_LIMIT="30",
        TASKDOCK_LOG_LEVEL="INFO",
        **{LEDGER_DSN_ENV: ledger_dsn},
    )


@pytest.mark.timeout(TIMEOUT)
def test_nothing_accepted_is_lost_under_chaos(
    tmp_path: Path, servers: tuple[PostgresServer, RedisServer]
) -> None:
    postgres, broker = servers
    database_url = postgres.create_database("taskdock")
    dsn = postgres.dsn("taskdock")
    env = chaos_env(tmp_path / "data", database_url, dsn, broker.url)
    migrated = taskdock("migrate", env=env)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(LEDGER_DDL)

    with running_stack(env, tmp_path / "logs") as stack:
        system = ChaosSystem(stack=stack, redis=broker, postgres=postgres, api_port=free_port())
        system.start()
        soak = run_soak(system, dsn)
        report = build_report(soak, system, dsn, stack)
    report["duration_s"] = round(time.time() - soak.started, 1)
    for path in write_reports(report, RESULTS_DIR, soak.sampler.samples, name=NAME):
        print(f"chaos report: {path}")

    result = report["check"]
    injected = {window.kind for window in soak.windows}
    assert injected == set(KINDS), f"the run was too short for every fault: {injected}"
    assert result["accepted"] >= 0.5 * result["submitted"], result["rejected_by_status"]
    assert result["lost"] == 0, report["lost_details"]
    assert result["unexpected"] == 0, result["unexpected_seqs"]
    assert result["duplicate_records"] == 0
    assert result["succeeded_without_execution"] == []
    assert result["failed"] == 0, result["failed_errors"]


def run_soak(system: ChaosSystem, dsn: str) -> Soak:
    """The load for SECONDS while faults rotate, then the drain; every thread stopped after."""
    sampler = MemorySampler(system.pids, interval=2.0)
    low, high = SLEEP_MS
    load = Load(system.base_url, rate=RATE, sleep_ms=(low, high), keys=KEYS)
    started = time.time()
    sampler.start()
    try:
        load.start()
        try:
            windows = run_faults(
                system,
                until=started + SECONDS,
                interval=FAULT_INTERVAL,
                stop_seconds=STOP_SECONDS,
                rng=random.Random(),
            )
        finally:
            requests = load.stop()
        drain_seconds = drain(system, dsn)
    finally:
        sampler.stop()
    return Soak(started, windows, requests, drain_seconds, sampler)


def drain(system: ChaosSystem, dsn: str) -> float:
    """Wait until no task is unfinished (or DRAIN_SECONDS pass); the check judges the rest."""
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_SECONDS:
        system.revive()
        if unfinished(dsn) == 0:
            break
        time.sleep(1)
    return round(time.monotonic() - started, 1)


def unfinished(dsn: str) -> int:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        row = connection.execute(
            "SELECT count(*) FROM task WHERE status <> ALL(%s)", (sorted(TERMINAL),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def build_report(soak: Soak, system: ChaosSystem, dsn: str, stack: Stack) -> dict[str, Any]:
    tasks, ledger = read_records(dsn)
    result = check(soak.requests, tasks, ledger, soak.windows, soak.started)
    return {
        "started_at": soak.started,
        "started_at_iso": datetime.fromtimestamp(soak.started, UTC).isoformat(timespec="seconds"),
        "settings": {
            "seconds": SECONDS,
            "rate": RATE,
            "sleep_ms": list(SLEEP_MS),
            "idempotency_keys": KEYS,
            "fault_interval": FAULT_INTERVAL,
            "stop_seconds": STOP_SECONDS,
            "workers": 2,
            "concurrency": system.concurrency,
            "lease_seconds": float(stack.env["TASKDOCK_TASK_LEASE_SECONDS"]),
            "republish_after_seconds": float(stack.env["TASKDOCK_REPUBLISH_AFTER_SECONDS"]),
        },
        "machine": machine(),
        "fault_windows": windows_as_dicts(soak.windows, soak.started),
        "unexpected_exits": [asdict(exit_) for exit_ in system.exits],
        "drain_seconds": soak.drain_seconds,
        "memory": soak.sampler.summary(),
        "memory_samples_mib": [
            {"t": round(at - soak.started, 1), **{k: round(v / 2**20, 1) for k, v in s.items()}}
            for at, s in soak.sampler.samples
        ],
        "check": result,
        "lost_details": [
            evidence(item["task_id"], dsn, stack) for item in result["lost_tasks"][:20]
        ],
        "examples": {
            outcome: [r.detail for r in soak.requests if r.outcome == outcome][:10]
            for outcome in (REJECTED, INDETERMINATE)
        },
        "stale_deliveries_skipped": log_count(stack, "stale delivery skipped"),
        "logs": str(stack.logs),
    }


def log_count(stack: Stack, message: str) -> int:
    """Occurrences of a log message; a restarted process appends to its predecessor's log."""
    logs = {proc.log: proc for proc in stack.procs}
    return sum(proc.output().count(message) for proc in logs.values())


def read_records(dsn: str) -> tuple[list[TaskRow], list[Execution]]:
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        tasks = [
            TaskRow(str(row[0]), *row[1:])
            for row in connection.execute(
                "SELECT id, (payload->>'seq')::int, status, attempt, deliveries, error,"
                " extract(epoch FROM created_at)::float8, extract(epoch FROM finished_at)::float8"
                " FROM task"
            )
        ]
        ledger = [
            Execution(str(row[0]), *row[1:])
            for row in connection.execute(
                "SELECT task_id, seq, attempt, delivery, pid, started_at, finished_at"
                " FROM chaos_ledger ORDER BY id"
            )
        ]
    return tasks, ledger


def evidence(task_id: str | None, dsn: str, stack: Stack) -> dict[str, Any]:
    """What a lost task looks like: its record, its executions, every log line naming it."""
    if task_id is None:
        return {}
    with psycopg.connect(dsn, connect_timeout=5, row_factory=dict_row) as connection:
        record = connection.execute("SELECT * FROM task WHERE id = %s", (task_id,)).fetchone()
        runs = connection.execute(
            "SELECT * FROM chaos_ledger WHERE task_id = %s ORDER BY id", (task_id,)
        ).fetchall()
    lines = [
        f"{proc.name}: {line}"
        for proc in stack.procs
        for line in proc.output().splitlines()
        if task_id in line
    ]
    return {"task_id": task_id, "record": record, "ledger": runs, "log_lines": lines[:40]}
