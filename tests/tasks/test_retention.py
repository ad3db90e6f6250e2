"""Retention: the purge deletes expired finished records, and nothing else, on both databases."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel
from sqlalchemy import Table, event, func, insert, select, text

from app.core.config import get_settings
from app.core.db import get_engine, session_scope
from app.db.base import utcnow
from app.tasks import retention
from app.tasks.dispatcher import Dispatcher
from app.tasks.models import Task, TaskRun
from app.tasks.registry import task_type
from app.tasks.states import RunOutcome, TaskStatus
from tests.support.services import celery_app, free_port, wait_for
from tests.support.stack import running_stack, taskdock

DAY = timedelta(days=1)
TABLE = cast(Table, Task.__table__)


@pytest.fixture(params=["embedded", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    """The embedded database, then PostgreSQL (with the filesystem broker)."""
    fixture = "embedded_env" if request.param == "embedded" else "pg_env"
    env: dict[str, str] = request.getfixturevalue(fixture)
    return env


def seed(
    status: TaskStatus,
    *,
    finished_ago: timedelta | None,
    type_: str = "process_data",
    count: int = 1,
    result: Any = None,
) -> list[uuid.UUID]:
    """Records as a worker or a cancel would have left them, `finished_ago` from now."""
    now = utcnow()
    rows = [
        {
            "id": uuid.uuid4(),
            "type": type_,
            "payload": {},
            "status": status,
            "queue": "default",
            "priority": 0,
            "attempt": 1,
            "max_attempts": 1,
            "deliveries": 1,
            "run_after": now - (finished_ago or timedelta(0)) - DAY,
            "owner": "",
            "result": result,
            "created_at": now - (finished_ago or timedelta(0)) - DAY,
            "updated_at": now,
            "finished_at": None if finished_ago is None else now - finished_ago,
        }
        for _ in range(count)
    ]
    with get_engine().begin() as connection:
        connection.execute(insert(TABLE), rows)
    return [row["id"] for row in rows]


def remaining(ids: list[uuid.UUID]) -> int:
    with get_engine().connect() as connection:
        return int(connection.scalar(select(func.count()).where(TABLE.c.id.in_(ids))) or 0)


def purged_metric(status: str) -> float:
    value = REGISTRY.get_sample_value("taskdock_tasks_purged_total", {"status": status})
    return value or 0.0


def purge(**kwargs: Any) -> retention.Purged:
    engine = get_engine()
    return retention.purge(
        engine=engine,
        settings=get_settings(),
        lock=engine.dialect.name == "postgresql",
        **kwargs,
    )


def test_expired_finished_records_go_and_nothing_else(database: dict[str, str]) -> None:
    # Defaults: SUCCEEDED 7 days, FAILED and CANCELLED 30 days.
    expired = [
        *seed(TaskStatus.SUCCEEDED, finished_ago=8 * DAY, count=3),
        *seed(TaskStatus.FAILED, finished_ago=31 * DAY, count=2),
        *seed(TaskStatus.CANCELLED, finished_ago=40 * DAY),
    ]
    kept = [
        *seed(TaskStatus.SUCCEEDED, finished_ago=6 * DAY),
        *seed(TaskStatus.FAILED, finished_ago=8 * DAY),  # past SUCCEEDED's period, not FAILED's
        *seed(TaskStatus.CANCELLED, finished_ago=29 * DAY),
    ]
    # Unfinished records, however old: never chosen, even one with a finished_at.
    unfinished = [
        task_id
        for status in (TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RETRYING)
        for task_id in seed(status, finished_ago=None, count=2)
    ]
    unfinished += seed(TaskStatus.RUNNING, finished_ago=90 * DAY)
    before = purged_metric("SUCCEEDED")

    counted = purge(dry_run=True)
    assert counted.counts == {
        TaskStatus.CANCELLED: 1,
        TaskStatus.FAILED: 2,
        TaskStatus.SUCCEEDED: 3,
    }
    assert remaining(expired) == len(expired)  # a dry run deletes nothing

    purged = purge()

    assert purged.counts == counted.counts
    assert not purged.more
    assert remaining(expired) == 0
    assert remaining(kept) == len(kept)
    assert remaining(unfinished) == len(unfinished)
    assert purged_metric("SUCCEEDED") - before == 3
    assert purge().total == 0  # nothing left to do


def test_small_batches_delete_everything(database: dict[str, str], configure: object) -> None:
    configure({**database, "TASKDOCK_RETENTION_BATCH_SIZE": "7"})  # type: ignore[operator]
    ids = seed(TaskStatus.SUCCEEDED, finished_ago=10 * DAY, count=50)
    assert purge().counts[TaskStatus.SUCCEEDED] == 50
    assert remaining(ids) == 0


def test_a_task_type_keeps_its_own_retention(database: dict[str, str]) -> None:
    # tests.short_lived: SUCCEEDED for an hour, FAILED forever; CANCELLED by the settings.
    short = seed(
        TaskStatus.SUCCEEDED, finished_ago=2 * timedelta(hours=1), type_="tests.short_lived"
    )
    fresh = seed(
        TaskStatus.SUCCEEDED, finished_ago=timedelta(minutes=30), type_="tests.short_lived"
    )
    forever = seed(TaskStatus.FAILED, finished_ago=400 * DAY, type_="tests.short_lived")
    cancelled = seed(TaskStatus.CANCELLED, finished_ago=31 * DAY, type_="tests.short_lived")
    other = seed(TaskStatus.SUCCEEDED, finished_ago=timedelta(hours=2))

    purged = purge()

    assert purged.counts[TaskStatus.SUCCEEDED] == 1
    assert purged.counts[TaskStatus.CANCELLED] == 1
    assert remaining(short) == 0
    assert remaining(cancelled) == 0
    assert remaining(fresh + forever + other) == 3


def test_zero_keeps_a_status_forever(database: dict[str, str], configure: object) -> None:
    configure({**database, "TASKDOCK_RETENTION_SUCCEEDED_SECONDS": "0"})  # type: ignore[operator]
    kept = seed(TaskStatus.SUCCEEDED, finished_ago=1000 * DAY)
    gone = seed(TaskStatus.FAILED, finished_ago=1000 * DAY)
    purge()
    assert remaining(kept) == 1
    assert remaining(gone) == 0


def test_the_runs_of_a_purged_task_go_with_it(database: dict[str, str]) -> None:
    """task_run has no foreign key (migration 0015): the purge deletes the runs of exactly the
    tasks it deletes, in the same transaction."""
    expired = seed(TaskStatus.FAILED, finished_ago=40 * DAY, count=2)
    kept = seed(TaskStatus.FAILED, finished_ago=DAY)
    now = utcnow()
    runs = cast(Table, TaskRun.__table__)
    with get_engine().begin() as connection:
        connection.execute(
            insert(runs),
            [
                {
                    "task_id": task_id,
                    "attempt": 1,
                    "delivery": delivery,
                    "worker": "w@host",
                    "outcome": RunOutcome.FAILED,
                    "started_at": now - 41 * DAY,
                    "finished_at": now - 40 * DAY,
                }
                for task_id in [*expired, *kept]
                for delivery in (1, 2)
            ],
        )

    assert purge().counts[TaskStatus.FAILED] == 2

    with get_engine().connect() as connection:
        left = connection.execute(select(runs.c.task_id, func.count()).group_by(runs.c.task_id))
        assert {task_id: int(count) for task_id, count in left} == {kept[0]: 2}


def test_rows_that_reference_a_task_go_with_it(database: dict[str, str]) -> None:
    """Webhook deliveries reference their task ON DELETE CASCADE: SQLite enforces it too
    (PRAGMA foreign_keys), so a purge leaves no orphan on either database."""
    uuid_type = "UUID" if get_engine().dialect.name == "postgresql" else "CHAR(32)"
    with get_engine().begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE child (id INTEGER PRIMARY KEY, task_id {uuid_type} NOT NULL"
                " REFERENCES task (id) ON DELETE CASCADE)"
            )
        )
    expired = seed(TaskStatus.SUCCEEDED, finished_ago=10 * DAY)[0]
    kept = seed(TaskStatus.SUCCEEDED, finished_ago=DAY)[0]
    with session_scope() as session:
        key = session.get_bind().dialect.name
        for number, task_id in enumerate([expired, expired, kept]):
            value = str(task_id) if key == "postgresql" else task_id.hex
            session.execute(
                text("INSERT INTO child (id, task_id) VALUES (:id, :task_id)"),
                {"id": number, "task_id": value},
            )

    purge()

    with get_engine().connect() as connection:
        assert connection.scalar(text("SELECT count(*) FROM child")) == 1


def test_the_dispatcher_purges_a_slice_per_tick(database: dict[str, str]) -> None:
    ids = seed(TaskStatus.FAILED, finished_ago=31 * DAY, count=5)
    dispatcher = Dispatcher(settings=get_settings(), celery_app=celery_app())

    report = dispatcher.tick()

    assert report.purged is not None
    assert report.purged.counts[TaskStatus.FAILED] == 5
    assert remaining(ids) == 0
    # Not due again before TASKDOCK_RETENTION_INTERVAL.
    seed(TaskStatus.FAILED, finished_ago=31 * DAY)
    assert dispatcher.tick().purged is None


def test_the_cli_counts_then_deletes(database: dict[str, str]) -> None:
    ids = seed(TaskStatus.SUCCEEDED, finished_ago=8 * DAY, count=2)
    ids += seed(TaskStatus.CANCELLED, finished_ago=31 * DAY)

    dry = taskdock("purge", "--dry-run", env=database)
    assert dry.returncode == 0, dry.stderr
    assert "would delete 3 expired task records" in dry.stdout
    assert "SUCCEEDED=2" in dry.stdout
    assert "CANCELLED=1" in dry.stdout
    assert remaining(ids) == 3

    done = taskdock("purge", env=database)
    assert done.returncode == 0, done.stderr
    assert "deleted 3 expired task records" in done.stdout
    assert remaining(ids) == 0


@pytest.mark.parametrize(
    ("retention_", "problem"),
    [
        ({"QUEUED": timedelta(days=1)}, "retention for 'QUEUED'"),
        ({"DONE": timedelta(days=1)}, "retention for 'DONE'"),
        ({"FAILED": timedelta(0)}, "positive timedelta"),
        ({"FAILED": 3600}, "positive timedelta"),
    ],
)
def test_a_wrong_retention_is_refused_at_registration(
    retention_: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        task_type("tests.never_registered", input=BaseModel, retention=retention_)


# 200,000 finished rows on PostgreSQL ------------------------------------------------------------

SEED_200K = """
INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts,
                  deliveries, run_after, owner, created_at, updated_at, finished_at)
SELECT gen_random_uuid(), 'process_data', '{}', :status, 'default', 0, 1, 1, 1,
       now() - :age, '', now() - :age, now(),
       CASE WHEN :finished THEN now() - :age + (n % 1000) * interval '1 second' END
FROM generate_series(1, :count) AS n
"""


def seed_many(status: str, *, count: int, age: timedelta, finished: bool = True) -> None:
    with get_engine().begin() as connection:
        # The engine is the API's, whose statements stop after 10 s (app.core.db._API_LIMITS);
        # a seed of 120,000 rows through the events trigger can take longer on a busy machine.
        connection.execute(text("SET LOCAL statement_timeout = 0"))
        connection.execute(
            text(SEED_200K),
            {"status": status, "count": count, "age": age, "finished": finished},
        )


def counts_by_status() -> dict[str, int]:
    with get_engine().connect() as connection:
        rows = connection.execute(select(TABLE.c.status, func.count()).group_by(TABLE.c.status))
        return {str(status): int(count) for status, count in rows}


@pytest.fixture
def two_hundred_thousand(pg_env: dict[str, str]) -> dict[str, int]:
    seed_many("SUCCEEDED", count=120_000, age=10 * DAY)  # expired
    seed_many("FAILED", count=40_000, age=40 * DAY)  # expired
    seed_many("FAILED", count=20_000, age=5 * DAY)  # kept
    seed_many("QUEUED", count=10_000, age=90 * DAY, finished=False)
    seed_many("RUNNING", count=10_000, age=90 * DAY, finished=False)
    with get_engine().connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE task"))
    return counts_by_status()


@pytest.mark.slow
def test_200k_rows_purged_in_short_batches(two_hundred_thousand: dict[str, int]) -> None:
    assert sum(two_hundred_thousand.values()) == 200_000
    unfinished_ids = [
        row.id for row in _select(TABLE.c.status.in_(["QUEUED", "RUNNING"]), columns=[TABLE.c.id])
    ]
    # Every transaction the purge commits: how many rows it deleted.
    transactions: list[int] = []
    engine = get_engine()

    def began(connection: Any) -> None:
        connection.info["purge"] = 0

    def executed(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE") and "purge" in connection.info:
            connection.info["purge"] += max(0, cursor.rowcount)

    def committed(connection: Any) -> None:
        transactions.append(connection.info.pop("purge", 0))

    event.listen(engine, "begin", began)
    event.listen(engine, "after_cursor_execute", executed)
    event.listen(engine, "commit", committed)
    # Two purges at once (two dispatchers): SKIP LOCKED shares the work, nothing twice.
    results: list[retention.Purged] = []
    threads = [threading.Thread(target=lambda: results.append(purge())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)

    assert len(results) == 2
    assert sum(r.counts[TaskStatus.SUCCEEDED] for r in results) == 120_000
    assert sum(r.counts[TaskStatus.FAILED] for r in results) == 40_000
    assert counts_by_status() == {"FAILED": 20_000, "QUEUED": 10_000, "RUNNING": 10_000}
    assert remaining(unfinished_ids) == 20_000
    deleting = [rows for rows in transactions if rows]
    # At least 160 batches of at most 1,000 rows, each its own transaction. How long a batch
    # holds its locks, and what it costs the API meanwhile, is measured by the benchmarks
    # (bench/bench_purge.py), not timed here on a shared machine.
    assert len(deleting) >= 160
    assert max(deleting) <= 1000


def _select(*where: Any, columns: list[Any]) -> list[Any]:
    with get_engine().connect() as connection:
        return list(connection.execute(select(*columns).where(*where)))


def test_a_running_dispatcher_purges_and_counts_it(
    database: dict[str, str], tmp_path: Path
) -> None:
    ids = seed(TaskStatus.SUCCEEDED, finished_ago=8 * DAY, count=3)
    kept = seed(TaskStatus.QUEUED, finished_ago=None, type_="tests.side")  # no worker runs
    port = free_port()
    env = {**database, "TASKDOCK_DISPATCHER_METRICS_PORT": str(port)}
    with running_stack(env, tmp_path / "logs") as stack:
        dispatcher = stack.dispatcher()
        line = 'taskdock_tasks_purged_total{status="SUCCEEDED"} 3.0'

        def counted() -> bool:
            assert dispatcher.alive(), dispatcher.output()[-3000:]
            try:
                return line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.HTTPError:
                return False

        wait_for(counted, timeout=60, what="the dispatcher's purge")
    assert remaining(ids) == 0
    assert remaining(kept) == 1


def test_a_retry_racing_the_purge_is_404_not_500(
    pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge deletes a FAILED record between the retry's read and its update."""
    from app.core.db import session_scope
    from app.tasks import service
    from app.tasks.exceptions import TaskNotFound

    (task_id,) = seed(TaskStatus.FAILED, finished_ago=100 * DAY)
    read = service.get

    def read_then_purged(**kwargs: Any) -> Task:
        task = read(**kwargs)
        assert purge().total == 1  # its own connection, committed
        return task

    monkeypatch.setattr(service, "get", read_then_purged)
    with pytest.raises(TaskNotFound), session_scope() as session:
        service.retry(session=session, task_id=task_id, owner=None)
    assert remaining([task_id]) == 0
