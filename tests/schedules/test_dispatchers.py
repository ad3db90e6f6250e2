"""Schedules fired by real dispatcher processes on PostgreSQL and Redis, run by a real worker."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.core.db import session_scope
from app.schedules.models import Schedule
from app.tasks.models import Task
from tests.conftest import backend_env, migrate_now
from tests.support import services
from tests.support.stack import Stack, running_stack, wait_status

EVERY_SECOND = {"type": "sleep", "payload": {"seconds": 0}, "interval_seconds": 1}


@pytest.fixture
def system(tmp_path: Path, configure: Any) -> Iterator[tuple[Stack, TestClient]]:
    """PostgreSQL, Redis, an in-process API client (auth off) and room for processes."""
    from app.main import create_app

    with services.scratch_database() as url:
        env = backend_env("postgres-redis", tmp_path / "data", url)
        configure(env)
        migrate_now()
        with (
            running_stack(env, tmp_path / "logs") as stack,
            TestClient(create_app(), raise_server_exceptions=False) as client,
        ):
            yield stack, client


def create(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/api/v1/schedules", json={**EVERY_SECOND, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def slots(schedule_id: str) -> list[datetime]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Task.schedule_slot)
                .where(Task.schedule_id == schedule_id)
                .order_by(Task.schedule_slot)
            )
        )


def schedule_row(schedule_id: str) -> Schedule:
    with session_scope() as session:
        found = session.get(Schedule, schedule_id)
        assert found is not None
        return found


def gaps(found: list[datetime]) -> list[float]:
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(found)]


def test_three_dispatchers_fire_each_slot_once(system: tuple[Stack, TestClient]) -> None:
    stack, client = system
    schedule = create(client, catchup="all", catchup_window_seconds=60)
    stack.worker()
    dispatchers = [stack.dispatcher(f"dispatcher{i}") for i in range(3)]
    time.sleep(30)
    for dispatcher in dispatchers:
        assert dispatcher.alive(), stack.dump_logs()
        dispatcher.stop()
    found = slots(schedule["id"])
    assert len(found) == len(set(found))
    # One task per second, none missing between the first and the last.
    assert len(found) >= 25, stack.dump_logs()
    assert gaps(found) == [1.0] * (len(found) - 1)
    row = schedule_row(schedule["id"])
    assert (row.fired_count, row.skipped_count) == (len(found), 0)
    # Each is a task like any other: it ran, and says where it came from.
    with session_scope() as session:
        last = session.scalars(
            select(Task.id).where(Task.schedule_id == schedule["id"]).order_by(Task.created_at)
        ).all()[-1]
    task = wait_status(client, str(last), {"SUCCEEDED"}, timeout=30)
    assert task["schedule_id"] == schedule["id"]
    assert datetime.fromisoformat(task["schedule_slot"]) == found[-1]


def test_missed_slots_follow_the_catchup_policy_after_a_restart(
    system: tuple[Stack, TestClient],
) -> None:
    stack, client = system
    every = create(client, catchup="all", catchup_window_seconds=60)
    latest = create(client, catchup="latest")
    dispatcher = stack.dispatcher("before")
    services.wait_for(lambda: len(slots(latest["id"])) >= 2, timeout=30, what="first slots")
    dispatcher.stop()
    before = slots(latest["id"])[-1]
    # Slots may have passed before the dispatcher's first tick, too.
    skipped_before = schedule_row(latest["id"]).skipped_count
    time.sleep(10)
    stack.dispatcher("after")
    restarted = before + timedelta(seconds=9)
    services.wait_for(
        lambda: len([slot for slot in slots(latest["id"]) if slot > restarted]) >= 3,
        timeout=30,
        what="slots after the restart",
    )
    # `all`: every slot of the ten seconds fired once, late.
    caught_up = slots(every["id"])
    assert gaps(caught_up) == [1.0] * (len(caught_up) - 1)
    assert schedule_row(every["id"]).skipped_count == 0
    # `latest`: one task for the gap (its latest slot), then one per second again.
    after_stop = [gap for gap in gaps(slots(latest["id"])) if gap > 1.0]
    assert len(after_stop) == 1, slots(latest["id"])
    assert after_stop[0] >= 9
    assert schedule_row(latest["id"]).skipped_count - skipped_before == after_stop[0] - 1


def test_overlap_skip_fires_nothing_while_the_previous_task_runs(
    system: tuple[Stack, TestClient],
) -> None:
    stack, client = system
    schedule = create(client, type="sleep", payload={"seconds": 2.5}, overlap="skip")
    stack.worker(concurrency=2)
    stack.dispatcher()
    time.sleep(12)
    with session_scope() as session:
        tasks = list(
            session.scalars(
                select(Task).where(Task.schedule_id == schedule["id"]).order_by(Task.schedule_slot)
            )
        )
    assert 2 <= len(tasks) <= 5, stack.dump_logs()
    # Each one was fired only after the one before it had finished.
    for earlier, later in itertools.pairwise(tasks):
        assert earlier.finished_at is not None
        assert later.created_at >= earlier.finished_at
    row = schedule_row(schedule["id"])
    assert row.skipped_count >= 5
    assert row.fired_count == len(tasks)
    assert row.next_fire_at > datetime.now(tasks[0].created_at.tzinfo) - timedelta(seconds=2)
