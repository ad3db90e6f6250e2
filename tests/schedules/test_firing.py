"""The firing step on a fixed clock, on SQLite and PostgreSQL: catch-up, overlap, one task per
slot, and the schedules declared in code."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from app.core.config import ConfigError
from app.core.db import session_scope
from app.db.base import utcnow
from app.schedules import firing, service
from app.schedules.models import Schedule
from app.schedules.schemas import ScheduleCreate
from app.tasks.models import Task
from app.tasks.registry import ScheduleSpec, TaskType, _registry, get_task_type
from app.tasks.states import TaskStatus
from tests.conftest import migrate_now
from tests.support import services
from tests.support.stack import base_env

SLEEP = {"type": "sleep", "payload": {"seconds": 0}}


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path, configure: Any) -> Iterator[bool]:
    """Yields whether rows are locked (PostgreSQL)."""
    if request.param == "sqlite":
        configure(base_env(tmp_path / "data"))
        migrate_now()
        yield False
        return
    with services.scratch_database() as url:
        configure(base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=url))
        migrate_now()
        yield True


def create(**fields: Any) -> Schedule:
    with session_scope() as session:
        return service.create(
            session=session, data=ScheduleCreate(**{**SLEEP, **fields}), owner="o", extra_queues=[]
        )


def fire_at(now: datetime, lock: bool) -> firing._Round:
    with session_scope() as session:
        return firing.fire(session=session, now=now, lock=lock, extra_queues=[])


def reload(schedule_id: Any) -> Schedule:
    with session_scope() as session:
        found = session.get(Schedule, schedule_id)
        assert found is not None
        return found


def tasks_of(schedule_id: Any) -> list[Task]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Task).where(Task.schedule_id == schedule_id).order_by(Task.schedule_slot)
            )
        )


def test_catchup_latest_fires_one_task_for_a_gap(database: bool) -> None:
    schedule = create(interval_seconds=1, catchup="latest")
    anchor = schedule.anchor_at
    assert schedule.next_fire_at == anchor + timedelta(seconds=1)
    assert len(fire_at(anchor + timedelta(seconds=1.2), database).rows) == 1
    # Down for ten seconds.
    fired = fire_at(anchor + timedelta(seconds=11.5), database)
    assert [row["schedule_slot"] for row in fired.rows] == [anchor + timedelta(seconds=11)]
    assert fired.skipped == 9
    tasks = tasks_of(schedule.id)
    assert [task.schedule_slot for task in tasks] == [
        anchor + timedelta(seconds=1),
        anchor + timedelta(seconds=11),
    ]
    assert all(task.owner == "o" and task.type == "sleep" for task in tasks)
    after = reload(schedule.id)
    assert (after.fired_count, after.skipped_count) == (2, 9)
    assert after.next_fire_at == anchor + timedelta(seconds=12)
    assert after.last_task_id == tasks[-1].id


def test_catchup_all_fires_each_missed_slot_within_the_window(database: bool) -> None:
    schedule = create(interval_seconds=1, catchup="all", catchup_window_seconds=5)
    anchor = schedule.anchor_at
    fired = fire_at(anchor + timedelta(seconds=11.5), database)
    assert [row["schedule_slot"] for row in fired.rows] == [
        anchor + timedelta(seconds=s) for s in range(7, 12)
    ]
    assert fired.skipped == 6  # slots 1 to 6, older than the window
    # The same clock again: nothing more is due, nothing fires twice.
    assert fire_at(anchor + timedelta(seconds=11.5), database).rows == []
    assert len(tasks_of(schedule.id)) == 5


def test_a_slot_never_fires_twice_even_if_the_schedule_is_rewound(database: bool) -> None:
    schedule = create(interval_seconds=1, catchup="all")
    anchor = schedule.anchor_at
    assert len(fire_at(anchor + timedelta(seconds=3.5), database).rows) == 3
    # As if a second dispatcher read the schedule before the first one's commit.
    with session_scope() as session:
        session.execute(
            update(Schedule)
            .where(Schedule.id == schedule.id)
            .values(next_fire_at=anchor + timedelta(seconds=1))
        )
    assert len(fire_at(anchor + timedelta(seconds=4.5), database).rows) == 1
    assert [task.schedule_slot for task in tasks_of(schedule.id)] == [
        anchor + timedelta(seconds=s) for s in range(1, 5)
    ]
    # The slots found fired already are neither fired again nor counted as skipped.
    assert (reload(schedule.id).fired_count, reload(schedule.id).skipped_count) == (4, 0)


def test_overlap_skip_waits_for_the_previous_task(database: bool) -> None:
    schedule = create(interval_seconds=1, overlap="skip", catchup="all")
    anchor = schedule.anchor_at
    first = fire_at(anchor + timedelta(seconds=1.1), database)
    assert len(first.rows) == 1
    skipped = fire_at(anchor + timedelta(seconds=3.1), database)
    assert (skipped.rows, skipped.skipped) == ([], 2)
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == first.rows[0]["id"])
            .values(status=TaskStatus.RUNNING, attempt=1)
        )
    assert fire_at(anchor + timedelta(seconds=4.1), database).skipped == 1
    with session_scope() as session:
        session.execute(
            update(Task).where(Task.id == first.rows[0]["id"]).values(status=TaskStatus.SUCCEEDED)
        )
    # Finished: the next slot fires, and only one of two due ones, the second finding it busy.
    again = fire_at(anchor + timedelta(seconds=6.1), database)
    assert [row["schedule_slot"] for row in again.rows] == [anchor + timedelta(seconds=5)]
    assert again.skipped == 1
    assert reload(schedule.id).skipped_count == 4


def test_a_paused_schedule_does_not_fire_and_resumes_from_now(database: bool) -> None:
    schedule = create(interval_seconds=1)
    with session_scope() as session:
        service.pause(session=session, schedule_id=schedule.id, owner="o")
    anchor = schedule.anchor_at
    assert fire_at(anchor + timedelta(seconds=30), database).rows == []
    before = utcnow()
    with session_scope() as session:
        resumed = service.resume(session=session, schedule_id=schedule.id, owner="o")
    # The slots missed while paused are not owed: the next one is after the resume.
    assert not resumed.paused
    assert before < resumed.next_fire_at <= before + timedelta(seconds=1)
    assert tasks_of(schedule.id) == []


def test_a_fired_task_is_the_apis_submission(database: bool) -> None:
    schedule = create(
        type="process_data", payload={"user_id": 7, "data": "hi"}, interval_seconds=60, priority=5
    )
    row = fire_at(schedule.next_fire_at, database).rows[0]
    task = tasks_of(schedule.id)[0]
    assert task.id == row["id"]
    assert (task.queue, task.priority, task.status) == ("default", 5, TaskStatus.QUEUED)
    assert task.payload == {"user_id": 7, "data": "hi"}
    assert task.max_attempts == get_task_type("process_data").max_attempts
    # Marked published in the INSERT: the firing step publishes it right after its commit.
    assert task.published_at is not None
    assert task.notify_url is None


def test_a_fired_task_owes_its_schedules_webhook(database: bool) -> None:
    url = "https://hooks.example.com/taskdock"
    schedule = create(interval_seconds=60, notify_url=url)
    fire_at(schedule.next_fire_at, database)
    task = tasks_of(schedule.id)[0]
    # What the delivery outbox reads: a notify_url not yet notified.
    assert (task.notify_url, task.notified_at) == (url, None)


def test_deleting_a_schedule_keeps_its_tasks(database: bool) -> None:
    schedule = create(interval_seconds=1)
    fire_at(schedule.anchor_at + timedelta(seconds=2.5), database)
    with session_scope() as session:
        service.delete(session=session, schedule_id=schedule.id, owner="o")
    with session_scope() as session:
        kept = list(session.scalars(select(Task).where(Task.type == "sleep")))
    assert len(kept) == 1
    assert kept[0].schedule_id is None
    assert kept[0].schedule_slot is not None


@pytest.fixture
def declared(database: bool) -> Iterator[dict[str, TaskType]]:
    """Task types with code-declared schedules, gone again after the test."""
    added: dict[str, TaskType] = {}
    yield added
    for name in added:
        _registry.pop(name, None)


def declare(added: dict[str, TaskType], *specs: ScheduleSpec) -> None:
    base = get_task_type("sleep")
    name = "tests.declared"
    _registry[name] = added[name] = TaskType(
        name=name, func=base.func, input_model=base.input_model, schedules=specs
    )


def sync(lock: bool) -> list[Schedule]:
    with session_scope() as session:
        firing.sync_declared(
            session=session, declared=firing.declared_schedules(extra_queues=[]), lock=lock
        )
    with session_scope() as session:
        return list(session.scalars(select(Schedule).order_by(Schedule.name)))


def test_code_declared_schedules_are_created_updated_and_removed(
    database: bool, declared: dict[str, TaskType]
) -> None:
    payload = {"seconds": 0}
    declare(
        declared,
        ScheduleSpec(name="nightly", cron="0 3 * * *", timezone="Europe/Berlin", payload=payload),
        ScheduleSpec(name="often", interval_seconds=5, payload=payload),
    )
    first = sync(database)
    assert [(s.name, s.owner, s.source) for s in first] == [
        ("nightly", "", "code"),
        ("often", "", "code"),
    ]
    assert sync(database)[0].id == first[0].id  # unchanged: the same rows
    hook = "https://hooks.example.com/nightly"
    declare(
        declared,
        ScheduleSpec(name="nightly", cron="0 4 * * *", payload=payload, notify_url=hook),
    )
    (only,) = sync(database)
    assert (only.id, only.cron, only.timezone) == (first[0].id, "0 4 * * *", "UTC")
    assert only.notify_url == hook
    # A schedule of a task type this process does not load is not its to remove.
    _registry.pop("tests.declared")
    assert [s.id for s in sync(database)] == [only.id]
    assert only.next_fire_at.minute == 0
    assert only.next_fire_at.hour == 4


def test_a_bad_code_declared_schedule_stops_the_dispatcher_with_one_line(
    database: bool, declared: dict[str, TaskType]
) -> None:
    declare(declared, ScheduleSpec(name="bad", cron="0 3 * *", payload={"seconds": 0}))
    with pytest.raises(
        ConfigError, match=r"schedule 'bad' of task type 'tests\.declared': cron: .*5 fields"
    ):
        firing.declared_schedules(extra_queues=[])
    declare(declared, ScheduleSpec(name="bad", interval_seconds=5, payload={"seconds": "x"}))
    with pytest.raises(ConfigError, match="payload"):
        firing.declared_schedules(extra_queues=[])
    declare(
        declared,
        ScheduleSpec(name="bad", interval_seconds=5, payload={"seconds": 0}, notify_url="ftp://x"),
    )
    with pytest.raises(ConfigError, match=r"notify_url: .*http or https"):
        firing.declared_schedules(extra_queues=[])


def test_metrics_report_schedules_and_their_slots(database: bool) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    schedule = create(interval_seconds=1)
    paused = create(interval_seconds=1, paused=True)
    assert paused.paused
    fire_at(schedule.anchor_at + timedelta(seconds=5.5), database)
    with TestClient(create_app()) as client:
        text = client.get("/metrics").text
    assert 'taskdock_schedules{state="active"} 1.0' in text
    assert 'taskdock_schedules{state="paused"} 1.0' in text
    assert 'taskdock_schedule_slots{outcome="fired"} 1.0' in text
    assert 'taskdock_schedule_slots{outcome="skipped"} 4.0' in text


def test_the_dispatchers_step_syncs_fires_and_publishes(
    database: bool, declared: dict[str, TaskType]
) -> None:
    from app.core.config import get_settings

    declare(declared, ScheduleSpec(name="often", interval_seconds=2, payload={"seconds": 0}))
    scheduler = firing.Scheduler(
        settings=get_settings(), celery_app=services.celery_app(), lock=database, min_gap=0
    )
    assert scheduler.fire_due().errors == []
    (row,) = sync(database)
    assert (row.name, row.source, row.type) == ("often", "code", "tests.declared")
    result = scheduler.fire_due(now=row.next_fire_at + timedelta(seconds=0.5))
    assert (result.fired, result.skipped, result.errors) == (1, 0, [])
    (task,) = tasks_of(row.id)
    assert task.published_at is not None


def test_fired_tasks_wait_in_the_outbox_while_the_broker_is_away(database: bool) -> None:
    from app.core.celery import create_celery_app
    from app.core.config import get_settings

    schedule = create(interval_seconds=1)
    away = f"redis://127.0.0.1:{services.free_port()}/0"
    settings = get_settings().model_copy(update={"broker_url": away, "publish_timeout": 0.5})
    scheduler = firing.Scheduler(
        settings=settings, celery_app=create_celery_app(settings), lock=database, min_gap=0
    )
    result = scheduler.fire_due(now=schedule.next_fire_at)
    assert result.fired == 1
    assert any(error.startswith("publish:") for error in result.errors), result.errors
    (task,) = tasks_of(schedule.id)
    # Unmarked: the dispatcher's outbox sends it once the broker is back.
    assert (task.published_at, task.queued_at, task.status) == (None, None, TaskStatus.QUEUED)


def test_a_cron_in_a_time_zone_fires_once_through_the_fall_back_night(database: bool) -> None:
    schedule = create(cron="30 2 * * *", timezone="Europe/Berlin", catchup="all")
    # 02:30 in Berlin happens twice on 2026-10-25: at 00:30 and at 01:30 UTC.
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    with session_scope() as session:
        session.execute(
            update(Schedule).where(Schedule.id == schedule.id).values(next_fire_at=first)
        )
    for minutes in range(0, 180, 20):
        fire_at(first + timedelta(minutes=minutes), database)
    assert [task.schedule_slot for task in tasks_of(schedule.id)] == [first]
    assert reload(schedule.id).next_fire_at == datetime(2026, 10, 26, 1, 30, tzinfo=UTC)
