"""The dispatcher's wake-up on PostgreSQL (LISTEN/NOTIFY), and publishing without the API."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from app.core.celery import get_celery_app
from app.core.config import get_settings
from app.core.db import get_engine, session_scope
from app.tasks import service
from app.tasks.dispatcher import Dispatcher, OutboxListener
from app.tasks.models import Task
from app.tasks.schemas import TaskCreate

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
            publishing=published,
        )
    return task.id


def test_a_commit_to_the_outbox_wakes_the_listener(listener: OutboxListener) -> None:
    # Listening has just begun: one look is owed for what was committed before it.
    assert listener.wait(0.05) is True
    assert listener.wait(0.05) is False

    record(published=False)
    record(published=False)
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

    report = Dispatcher(settings=get_settings(), celery_app=get_celery_app()).tick()

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
