"""Claim, lease and fence (lifecycle), reap and recover (recovery), the outbox (publication).

On the real databases: SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import update

from app.core.config import get_settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import lifecycle, publication, recovery, service
from app.tasks.models import Task
from app.tasks.schemas import TaskCreate
from app.tasks.states import IllegalTransition, TaskStatus


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    request.getfixturevalue("embedded_env" if name == "sqlite" else "pg_env")
    return name


def new_task(**fields: object) -> uuid.UUID:
    data = TaskCreate.model_validate(
        {"type": "process_data", "payload": {"user_id": 1, "data": "x"}, **fields}
    )
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
        return task.id


def claim(task_id: uuid.UUID, attempt: int = 1, worker: str = "w") -> lifecycle.Claim | None:
    with session_scope() as session:
        return lifecycle.claim(
            session=session, task_id=task_id, attempt=attempt, worker=worker, lease_seconds=30
        )


def load(task_id: uuid.UUID) -> Task:
    with session_scope() as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def expire_lease(task_id: uuid.UUID) -> None:
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_claim_takes_the_task_once(database: str) -> None:
    task_id = new_task()

    first = claim(task_id)
    second = claim(task_id)

    assert first is not None
    assert first.delivery == 1
    assert first.payload == {"user_id": 1, "data": "x"}
    assert second is None  # a duplicate message while the lease is alive changes nothing
    assert load(task_id).status == TaskStatus.RUNNING


def test_claim_ignores_other_attempts(database: str) -> None:
    task_id = new_task()

    assert claim(task_id, attempt=2) is None
    assert load(task_id).status == TaskStatus.QUEUED


def test_stale_run_cannot_overwrite_the_newer_one(database: str) -> None:
    task_id = new_task()
    stale = claim(task_id, worker="old")
    assert stale is not None
    expire_lease(task_id)
    fresh = claim(task_id, worker="new")
    assert fresh is not None
    assert fresh.delivery == 2

    with session_scope() as session:
        assert not lifecycle.renew_lease(session=session, claim=stale, lease_seconds=30)
        assert not lifecycle.succeed(session=session, claim=stale, result={"from": "old"})
    with session_scope() as session:
        assert lifecycle.succeed(session=session, claim=fresh, result={"from": "new"})

    task = load(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result == {"from": "new"}
    assert task.worker is not None
    assert task.worker.startswith("new")


def test_finished_task_is_never_run_again(database: str) -> None:
    task_id = new_task()
    run = claim(task_id)
    assert run is not None
    with session_scope() as session:
        lifecycle.succeed(session=session, claim=run, result=1)

    assert claim(task_id) is None
    expire_lease(task_id)
    assert claim(task_id) is None


def test_failure_with_retries_left_schedules_the_next_attempt(database: str) -> None:
    task_id = new_task()
    run = claim(task_id)
    assert run is not None

    with session_scope() as session:
        status = lifecycle.fail(
            session=session, claim=run, error={"type": "E", "message": "m"}, retry_in=60
        )

    assert status is TaskStatus.RETRYING
    task = load(task_id)
    assert (task.status, task.attempt, task.deliveries) == ("RETRYING", 2, 0)
    assert task.published_at is None
    assert task.run_after > utcnow() + timedelta(seconds=50)
    assert claim(task_id, attempt=1) is None  # the old attempt's message is stale now


def test_last_attempt_failure_is_final(database: str) -> None:
    task_id = new_task()
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(max_attempts=1))
    run = claim(task_id)
    assert run is not None

    with session_scope() as session:
        status = lifecycle.fail(
            session=session, claim=run, error={"type": "E", "message": "m"}, retry_in=1
        )

    assert status is TaskStatus.FAILED
    assert load(task_id).finished_at is not None


def test_reaper_requeues_lost_runs_and_fails_poison(database: str) -> None:
    lost, poison = new_task(), new_task()
    for task_id in (lost, poison):
        assert claim(task_id) is not None
        expire_lease(task_id)
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == poison).values(deliveries=3))

    with session_scope() as session:
        reaped = recovery.reap_expired_leases(
            session=session, max_deliveries=3, hard_limit=lambda _type: 3600
        )

    assert (reaped.requeued, reaped.worker_lost, reaped.timed_out) == (1, 1, 0)
    assert load(lost).status == TaskStatus.QUEUED
    assert load(lost).published_at is None
    assert load(poison).status == TaskStatus.FAILED
    assert load(poison).error == {
        "type": "WorkerLost",
        "message": "the worker was lost 3 times running this attempt",
    }


def test_outbox_lists_due_unpublished_tasks_by_priority(database: str) -> None:
    low = new_task(priority=1)
    high = new_task(priority=8)
    new_task(countdown=3600)

    with session_scope() as session:
        due = publication.due_unpublished(
            session=session, limit=10, grace=0, lock=database == "postgres"
        )
        assert [task.id for task in due] == [high, low]
        publication.mark_many_published(session=session, published=[(high, 1)])
    with session_scope() as session:
        due = publication.due_unpublished(session=session, limit=10, grace=0, lock=False)
        assert [task.id for task in due] == [low]
        # Rows just written are left to the API's own publish for `grace` seconds.
        assert publication.due_unpublished(session=session, limit=10, grace=60, lock=False) == []


def test_a_batch_is_marked_published_by_attempt(database: str) -> None:
    first, second, stale = new_task(), new_task(), new_task()

    with session_scope() as session:
        publication.mark_many_published(
            session=session, published=[(first, 1), (second, 1), (stale, 2)]
        )

    assert load(first).published_at is not None
    assert load(second).published_at is not None
    assert load(first).queued_at is not None
    assert load(stale).published_at is None  # a message for another attempt marks nothing


def test_only_publications_the_broker_lost_are_forgotten(database: str) -> None:
    older, newer, fresh = new_task(), new_task(), new_task()
    with session_scope() as session:
        publication.mark_many_published(
            session=session, published=[(older, 1), (newer, 1), (fresh, 1)]
        )
        for task_id, age in ((older, 3600), (newer, 1800)):
            session.execute(
                update(Task)
                .where(Task.id == task_id)
                .values(published_at=utcnow() - timedelta(seconds=age))
            )
    asked: list[list[str]] = []

    def held(count: int) -> object:
        def depths(queues: list[str]) -> dict[str, int]:
            asked.append(queues)
            return {"default": count}

        return depths

    with session_scope() as session:
        # The broker holds a message for every published row: a backlog, nothing lost.
        assert recovery.forget_lost_publications(session=session, older_than=600, held=held(3)) == 0
        # One missing: the oldest publication goes back to the outbox, and only it.
        assert recovery.forget_lost_publications(session=session, older_than=600, held=held(2)) == 1
    assert asked == [["default"], ["default"]]
    assert load(older).published_at is None
    assert load(older).queued_at is not None
    assert load(newer).published_at is not None
    with session_scope() as session:
        # A flushed broker: every row published long enough ago, never the fresh one.
        assert recovery.forget_lost_publications(session=session, older_than=600, held=held(0)) == 1
    assert load(newer).published_at is None
    assert load(fresh).published_at is not None


def test_runner_runs_a_task_once(database: str) -> None:
    from app.worker.runner import Outcome, execute

    task_id = new_task()
    ended = execute(task_id=task_id, attempt=1, worker="inproc", settings=get_settings())

    assert ended.outcome is Outcome.SUCCEEDED
    task = load(task_id)
    assert task.status == TaskStatus.SUCCEEDED
    assert task.result["processed"] == "X"
    again = execute(task_id=task_id, attempt=1, worker="x", settings=get_settings())
    assert again.outcome is Outcome.STALE


def test_reaper_ends_a_run_killed_by_its_hard_time_limit(database: str) -> None:
    task_id = new_task()
    assert claim(task_id) is not None
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(
                started_at=utcnow() - timedelta(seconds=120),
                lease_expires_at=utcnow() - timedelta(seconds=1),
            )
        )

    with session_scope() as session:
        reaped = recovery.reap_expired_leases(
            session=session, max_deliveries=3, hard_limit=lambda _type: 70
        )

    assert reaped.timed_out == 1
    task = load(task_id)
    assert task.status == TaskStatus.FAILED
    assert task.error is not None
    assert task.error["type"] == "TimeLimitExceeded"


def test_a_second_retry_makes_no_second_attempt(database: str) -> None:
    task_id = new_task()
    with session_scope() as session:
        service.cancel(session=session, task_id=task_id, owner=None)
    with session_scope() as first_session:
        first = service.retry(session=first_session, task_id=task_id, owner=None)
    with session_scope() as second_session, pytest.raises(IllegalTransition):
        service.retry(session=second_session, task_id=task_id, owner=None)

    assert first.attempt == 2
    assert load(task_id).attempt == 2


def forget_claim(task_id: uuid.UUID) -> None:
    """What a database crash leaves of an asynchronously committed claim: the waiting row."""
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(status="QUEUED", deliveries=Task.deliveries - 1, lease_expires_at=None)
        )


def test_a_claim_the_database_forgot_is_put_back_by_the_runs_next_write(database: str) -> None:
    renewed_id, finished_id, failed_id, cancelled_id = (new_task() for _ in range(4))
    claims = {task_id: claim(task_id) for task_id in (renewed_id, finished_id, failed_id)}
    for task_id in (renewed_id, finished_id, failed_id, cancelled_id):
        if task_id in claims:
            forget_claim(task_id)
    cancelled_claim = claim(cancelled_id)
    assert cancelled_claim is not None
    with session_scope() as session:
        service.cancel(session=session, task_id=cancelled_id, owner=None)

    with session_scope() as session:
        renewed = claims[renewed_id]
        assert renewed is not None
        assert lifecycle.renew_lease(session=session, claim=renewed, lease_seconds=30)
        done = claims[finished_id]
        assert done is not None
        assert lifecycle.succeed(session=session, claim=done, result={"ok": True})
        failed = claims[failed_id]
        assert failed is not None
        status = lifecycle.fail(session=session, claim=failed, error={"type": "E"}, retry_in=None)
        assert status is TaskStatus.FAILED
        # A cancel is not a forgotten claim: the run has lost the task.
        assert not lifecycle.succeed(session=session, claim=cancelled_claim, result=None)

    assert (load(renewed_id).status, load(renewed_id).deliveries) == (TaskStatus.RUNNING, 1)
    assert load(renewed_id).lease_expires_at is not None
    assert (load(finished_id).status, load(finished_id).deliveries) == (TaskStatus.SUCCEEDED, 1)
    assert (load(failed_id).status, load(failed_id).deliveries) == (TaskStatus.FAILED, 1)
    assert load(cancelled_id).status == TaskStatus.CANCELLED


@pytest.mark.postgres
def test_outcomes_wait_for_the_wal_flush_and_claims_do_not(pg_env: dict[str, str]) -> None:
    """On the worker's connections (synchronous_commit=off) only the outcome is made durable."""
    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from app.core.db import build_engine

    engine = build_engine(get_settings(), role="worker")
    task_ids = [new_task(), new_task()]
    try:
        with Session(engine) as session:
            taken = lifecycle.claim(
                session=session, task_id=task_ids[0], attempt=1, worker="w", lease_seconds=30
            )
            assert taken is not None
            assert session.scalar(text("SHOW synchronous_commit")) == "off"
            assert lifecycle.succeed(session=session, claim=taken, result=1)
            assert session.scalar(text("SHOW synchronous_commit")) == "on"
            session.commit()
            assert session.scalar(text("SHOW synchronous_commit")) == "off"  # this commit only
            other = lifecycle.claim(
                session=session, task_id=task_ids[1], attempt=1, worker="w", lease_seconds=30
            )
            assert other is not None
            lifecycle.fail(session=session, claim=other, error={"type": "E"}, retry_in=None)
            assert session.scalar(text("SHOW synchronous_commit")) == "on"
            session.commit()
    finally:
        engine.dispose()
    assert load(task_ids[0]).status == TaskStatus.SUCCEEDED
    assert load(task_ids[1]).status == TaskStatus.FAILED
