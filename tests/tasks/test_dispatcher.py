"""The dispatcher's wake-up on PostgreSQL (LISTEN/NOTIFY), and publishing without the API."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from redis import Redis
from sqlalchemy import text

from app.core.config import get_settings
from app.core.db import get_engine, session_scope
from app.tasks import service
from app.tasks.dispatcher import Dispatcher, OutboxListener
from app.tasks.models import Task
from app.tasks.publication import queue_depths
from app.tasks.schemas import TaskCreate
from tests.conftest import migrate_now
from tests.support.services import RedisServer, celery_app, scratch_database
from tests.support.stack import base_env

PROCESS = {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}


@pytest.fixture
def listener(pg_env: dict[str, str]) -> Iterator[OutboxListener]:
    listening = OutboxListener(get_engine(), threading.Event())
    try:
        yield listening
    finally:
        listening.close()


def record(*, published: bool) -> uuid.UUID:
    with session_scope() as session:
        task, _ = service.submit(
            session=session,
            data=TaskCreate.model_validate(PROCESS),
            owner="",
            idempotency_key=None,
            extra_queues=[],
            publishing=published,
        )
    return task.id


def test_a_commit_to_the_outbox_wakes_the_listener(listener: OutboxListener) -> None:
    # Listening has just begun: one look is owed for what was committed before it.
    assert listener.wait(0.05) is True
    assert listener.wait(0.05) is False

    record(published=False)
    record(published=False)
    # PostgreSQL sends each commit's notification on its own schedule; on a loaded machine the
    # second may reach the socket some milliseconds after the first. Once both have arrived,
    # one look must consume them all.
    time.sleep(0.5)
    assert listener.wait(5) is True
    # Both commits are answered by that one look: nothing is left pending.
    assert listener.wait(0.05) is False


def test_a_task_the_api_published_wakes_nobody(listener: OutboxListener) -> None:
    listener.wait(0.05)
    record(published=True)
    assert listener.wait(0.3) is False


def test_the_listener_listens_again_after_its_connection_is_killed(
    listener: OutboxListener,
) -> None:
    listener.wait(0.05)
    with get_engine().connect() as connection:
        killed = connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND query = 'LISTEN taskdock_outbox'"
            )
        ).scalar_one()
    assert killed == 1

    assert listener.wait(0.5) is False  # the broken connection is noticed and dropped
    assert listener.wait(0.05) is True  # listening again, and owing one look
    record(published=False)
    assert listener.wait(5) is True


def test_without_the_api_publishing_the_dispatcher_publishes_fresh_tasks_at_once(
    backend: dict[str, str], configure: object
) -> None:
    configure({**backend, "TASKDOCK_PUBLISH_ON_SUBMIT": "false"})  # type: ignore[operator]
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        response = client.post("/api/v1/tasks", json=PROCESS)
    assert response.status_code == 202, response.text
    task = response.json()
    assert task["queued_at"] is None  # the API did not tell the broker
    task_id = uuid.UUID(task["id"])
    with session_scope() as session:
        row = session.get(Task, task_id)
        assert row is not None
        assert row.published_at is None

    report = Dispatcher(settings=get_settings(), celery_app=celery_app()).tick()

    # No grace: no API publish is coming for it.
    assert report.published == 1, report
    with session_scope() as session:
        row = session.get(Task, task_id)
        assert row is not None
        assert row.published_at is not None


def test_a_stop_ends_a_long_wait(listener: OutboxListener) -> None:
    listener.wait(0.05)
    threading.Timer(0.2, listener.stop.set).start()
    started = time.monotonic()
    assert listener.wait(60) is False
    # Heard within a slice, not at the end of the minute (a bound far from both).
    assert time.monotonic() - started < 30


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.slow
def test_a_backlog_never_multiplies_and_a_flushed_broker_is_recovered(
    tmp_path: Path, configure: object
) -> None:
    """5,000 tasks wait with no worker for ten republish periods: still 5,000 messages.

    The old sweep re-published every row whose message was older than the period, whether or
    not the broker still held it: the queue grew by a backlog's worth each period.
    """
    backlog = 5000
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        with scratch_database() as url:
            configure(  # type: ignore[operator]
                base_env(
                    tmp_path / "data",
                    TASKDOCK_DATABASE_URL=url,
                    TASKDOCK_BROKER_URL=redis.url,
                    TASKDOCK_PUBLISH_ON_SUBMIT="false",
                    TASKDOCK_REPUBLISH_AFTER_SECONDS="60",
                )
            )
            migrate_now()
            with session_scope() as session:
                for _ in range(backlog):
                    service.submit(
                        session=session,
                        data=TaskCreate.model_validate(PROCESS),
                        owner="",
                        idempotency_key=None,
                        extra_queues=[],
                    )
            dispatcher = Dispatcher(settings=get_settings(), celery_app=celery_app())

            def period() -> int:
                """A republish period passes; returns what the broker holds afterwards."""
                with session_scope() as session:
                    session.execute(
                        text("UPDATE task SET published_at = published_at - interval '1 hour'")
                    )
                # The sweeps are due.
                dispatcher._last_sweep = dispatcher.recovery._last_lost_sweep = 0.0
                report = dispatcher.tick()
                assert not report.errors, report.errors
                while dispatcher.tick().published:
                    pass
                return queue_depths(celery_app(), ["default"])["default"]

            while dispatcher.tick().published:
                pass
            assert queue_depths(celery_app(), ["default"])["default"] == backlog
            held = [period() for _ in range(10)]
            assert held == [backlog] * 10

            redis_client = Redis.from_url(redis.url)
            redis_client.flushall()  # the broker restarted empty: every message is lost
            assert queue_depths(celery_app(), ["default"])["default"] == 0
            assert period() == backlog
            assert period() == backlog
    finally:
        redis.stop()
