"""The runner in this process, on the embedded database: outcomes a worker would record."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import update

from app.core.config import get_settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import service
from app.tasks.lifecycle import Claim
from app.tasks.models import Task
from app.tasks.registry import RetryPolicy, TaskContext
from app.tasks.schemas import TaskCreate
from app.worker.runner import LeaseRenewer, Outcome, execute

pytestmark = pytest.mark.usefixtures("embedded_env")


def submit(type_: str, payload: dict[str, Any]) -> uuid.UUID:
    data = TaskCreate.model_validate({"type": type_, "payload": payload})
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
        return task.id


def run(task_id: uuid.UUID, attempt: int = 1) -> Outcome:
    return execute(task_id=task_id, attempt=attempt, worker="test", settings=get_settings()).outcome


def record(task_id: uuid.UUID) -> Task:
    with session_scope() as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def test_retryable_failure_then_success() -> None:
    task_id = submit("tests.flaky", {"fail_times": 1})

    assert run(task_id) is Outcome.RETRYING
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(run_after=utcnow()))
    assert run(task_id, attempt=2) is Outcome.SUCCEEDED
    assert record(task_id).result == {"attempt": 2}


def test_payload_is_validated_again_by_the_worker() -> None:
    task_id = submit("process_data", {"user_id": 1, "data": "x"})
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(payload={"user_id": "?"}))

    assert run(task_id) is Outcome.FAILED
    error = record(task_id).error
    assert error is not None
    assert error["type"] == "ValidationError"


def test_unregistered_type_fails_without_retry() -> None:
    task_id = submit("process_data", {"user_id": 1, "data": "x"})
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(type="removed.type"))

    assert run(task_id) is Outcome.FAILED
    error = record(task_id).error
    assert error is not None
    assert error["type"] == "UnknownTaskType"


def test_delivery_beyond_the_limit_ends_a_poison_task() -> None:
    task_id = submit("process_data", {"user_id": 1, "data": "x"})
    limit = get_settings().task_max_deliveries
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == task_id).values(deliveries=limit))

    assert run(task_id) is Outcome.FAILED
    task = record(task_id)
    assert task.status == "FAILED"
    assert task.error is not None
    assert task.error["type"] == "WorkerLost"


def test_cancel_while_running_discards_the_result() -> None:
    task_id = submit("sleep", {"seconds": 30})
    outcome: list[Outcome] = []
    runner = threading.Thread(target=lambda: outcome.append(run(task_id)))
    runner.start()
    deadline = time.monotonic() + 10
    while record(task_id).status != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.05)
    with session_scope() as session:
        service.cancel(session=session, task_id=task_id, owner=None)

    # The lease renewer notices within a third of the lease (3 s in tests) and stops the sleep.
    runner.join(timeout=10)

    assert not runner.is_alive()
    assert outcome == [Outcome.LOST]
    task = record(task_id)
    assert task.status == "CANCELLED"
    assert task.result is None


def test_retry_policy_backs_off_exponentially_with_jitter() -> None:
    policy = RetryPolicy(backoff=2, backoff_max=20)
    plain = RetryPolicy(backoff=2, backoff_max=20, jitter=False)

    assert [plain.delay(attempt) for attempt in (1, 2, 3, 4, 5)] == [2, 4, 8, 16, 20]
    for attempt in (1, 2, 3, 6):
        delays = {policy.delay(attempt) for _ in range(50)}
        ceiling = plain.delay(attempt)
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
        assert len(delays) > 1


def test_context_sleep_wakes_on_cancel() -> None:
    ctx = TaskContext(task_id="t", attempt=1, delivery=1)
    threading.Timer(0.1, ctx.cancel).start()
    started = time.monotonic()

    assert ctx.sleep(10) is False
    assert time.monotonic() - started < 5
    assert ctx.cancelled


def test_lease_is_renewed_while_running() -> None:
    task_id = submit("sleep", {"seconds": 2.5})
    leases: set[object] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            task = record(task_id)
            if task.status == "RUNNING":
                leases.add(task.lease_expires_at)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert run(task_id) is Outcome.SUCCEEDED
    finally:
        done.set()
        watcher.join()
    # A 3 s lease renewed every second: a 2.5 s run sees at least the first lease and one renewal.
    assert len(leases) >= 2
    assert record(task_id).lease_expires_at is None


def test_short_runs_do_not_wake_the_lease_renewer() -> None:
    """A run shorter than a third of its lease is never renewed: its renewer thread stays asleep.

    It used to sleep a minute when it held nothing, so that every new run, due for renewal in a
    third of its lease, woke it: a thread switch per task in a worker running short tasks.
    """
    renewer = LeaseRenewer()
    wakes = 0

    class CountingEvent(threading.Event):
        def set(self) -> None:
            nonlocal wakes
            wakes += 1
            super().set()

    renewer._wake = CountingEvent()
    for delivery in range(1, 41):
        claim = Claim(
            task_id=uuid.uuid4(),
            attempt=1,
            delivery=delivery,
            type="noop",
            payload={},
            max_attempts=1,
            run_after=utcnow(),
        )
        ctx = TaskContext(task_id=str(claim.task_id), attempt=1, delivery=delivery)
        with renewer.hold(claim=claim, ctx=ctx, lease_seconds=30):
            pass
        # The outcome's write happens here, after the hold: the renewer's thread may run.
        time.sleep(0.005)
    assert wakes == 0
