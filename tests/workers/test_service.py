"""The worker registry on both databases: heartbeats, stale workers, stranded queues."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import service as tasks_service
from app.tasks.schemas import TaskCreate
from app.workers import service
from app.workers.models import WorkerRecord


@pytest.fixture(params=["embedded", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    fixture = "embedded_env" if request.param == "embedded" else "pg_env"
    env: dict[str, str] = request.getfixturevalue(fixture)
    return env


def beat(name: str, queues: list[str]) -> None:
    with session_scope() as session:
        service.beat(
            session=session,
            name=name,
            queues=queues,
            concurrency=2,
            pid=123,
            started_at=utcnow(),
        )


def test_queue_report_counts_waiting_tasks_and_live_consumers(database: dict[str, str]) -> None:
    beat("a@host", ["default", "lonely"])
    beat("b@host", ["default"])
    beat("b@host", ["default"])  # a heartbeat updates, never duplicates
    beat("gone@host", ["side"])
    with session_scope() as session:
        session.execute(
            update(WorkerRecord)
            .where(WorkerRecord.name == "gone@host")
            .values(heartbeat_at=utcnow() - timedelta(seconds=60))
        )
        for data in (
            TaskCreate(type="process_data", payload={"user_id": 1, "data": "x"}),
            TaskCreate(type="tests.side"),
            TaskCreate(type="tests.side"),
            TaskCreate(type="tests.side", countdown=600),
        ):
            tasks_service.submit(
                session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
            )

    with session_scope() as session:
        reports = {
            report.name: report
            for report in service.queue_report(
                session=session, known={"default", "lonely"}, max_age=30
            )
        }
        live = [worker.name for worker in service.live_workers(session=session, max_age=30)]

    assert live == ["a@host", "b@host"]
    assert set(reports) == {"default", "lonely", "side"}
    assert (reports["default"].waiting, reports["default"].consumers) == (1, 2)
    assert not reports["default"].stranded
    assert (reports["lonely"].waiting, reports["lonely"].consumers) == (0, 1)
    # Two due (the delayed one is not), and the only worker of `side` stopped beating.
    assert (reports["side"].waiting, reports["side"].consumers) == (2, 0)
    assert reports["side"].stranded
    assert 0 <= reports["side"].oldest_seconds < 60


def test_forget_drops_one_worker_or_the_long_silent(database: dict[str, str]) -> None:
    beat("a@host", ["default"])
    beat("b@host", ["default"])
    beat("old@host", ["default"])
    with session_scope() as session:
        session.execute(
            update(WorkerRecord)
            .where(WorkerRecord.name == "old@host")
            .values(heartbeat_at=utcnow() - timedelta(hours=2))
        )
    with session_scope() as session:
        assert service.forget(session=session, name="a@host") == 1
        assert service.forget(session=session) == 1
        names = [worker.name for worker in service.live_workers(session=session, max_age=1e9)]
    assert names == ["b@host"]
