"""Run history: every run of every attempt, written by the statements that move the task.

On the real databases (SQLite and PostgreSQL), through the runner in this process, the API, and
real worker processes that are killed mid-run.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, update

from app.auth import service as keys
from app.auth.service import Scope
from app.core.config import get_settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import lifecycle, recovery, service
from app.tasks.models import Task, TaskRun
from app.tasks.schemas import TaskCreate, TaskRunRead
from app.tasks.states import RunOutcome, TaskStatus
from app.worker.runner import Outcome, execute
from tests.conftest import backend_env, migrate_now
from tests.support import services
from tests.support.stack import base_env, running_stack, wait_status


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    request.getfixturevalue("embedded_env" if name == "sqlite" else "pg_env")
    return name


def new_task(type_: str = "process_data", payload: dict[str, Any] | None = None) -> uuid.UUID:
    data = TaskCreate.model_validate(
        {"type": type_, "payload": payload if payload is not None else {"user_id": 1, "data": "x"}}
    )
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
        return task.id


def claim(task_id: uuid.UUID, attempt: int = 1, worker: str = "w") -> lifecycle.Claim:
    with session_scope() as session:
        taken = lifecycle.claim(
            session=session, task_id=task_id, attempt=attempt, worker=worker, lease_seconds=30
        )
    assert taken is not None
    return taken


def runs(task_id: uuid.UUID) -> list[TaskRunRead]:
    with session_scope() as session:
        found = service.list_runs(session=session, task_id=task_id, owner=None)
        return [TaskRunRead.model_validate(run) for run in found]


def shape(task_id: uuid.UUID) -> list[tuple[int, int, str]]:
    return [(run.attempt, run.delivery, run.outcome.value) for run in runs(task_id)]


def expire_lease(task_id: uuid.UUID) -> None:
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def test_a_task_that_fails_twice_then_succeeds_shows_three_runs(database: str) -> None:
    task_id = new_task("tests.flaky", {"fail_times": 2})

    outcomes = [
        execute(task_id=task_id, attempt=attempt, worker="inproc", settings=get_settings()).outcome
        for attempt in (1, 2, 3)
    ]

    assert outcomes == [Outcome.RETRYING, Outcome.RETRYING, Outcome.SUCCEEDED]
    history = runs(task_id)
    assert [(run.attempt, run.delivery, run.outcome) for run in history] == [
        (1, 1, RunOutcome.FAILED),
        (2, 1, RunOutcome.FAILED),
        (3, 1, RunOutcome.SUCCEEDED),
    ]
    for attempt, run in enumerate(history[:2], start=1):
        assert run.error is not None
        assert run.error.type == "FlakyError"
        assert run.error.message == f"failing attempt {attempt}"
        assert run.error.traceback is not None
        assert "FlakyError: failing attempt" in run.error.traceback
    assert history[2].error is None
    for run in history:
        assert run.worker is not None
        assert run.worker.startswith("inproc:")
        assert run.finished_at is not None
        assert run.duration == round((run.finished_at - run.started_at).total_seconds(), 6)
        assert run.duration is not None
        assert run.duration >= 0
    # The task keeps only the latest state.
    with session_scope() as session:
        task = session.get(Task, task_id)
        assert task is not None
        assert (task.status, task.attempt, task.error) == (TaskStatus.SUCCEEDED, 3, None)


def test_a_stale_run_changes_neither_the_task_nor_another_runs_row(database: str) -> None:
    task_id = new_task()
    stale = claim(task_id, worker="old")
    assert shape(task_id) == [(1, 1, "RUNNING")]
    expire_lease(task_id)
    fresh = claim(task_id, worker="new")
    # The redelivery's claim ends the run it superseded, in the same statement.
    assert shape(task_id) == [(1, 1, "LOST"), (1, 2, "RUNNING")]

    with session_scope() as session:
        assert not lifecycle.succeed(session=session, claim=stale, result={"from": "old"})
        error = {"type": "E", "message": "stale"}
        assert lifecycle.fail(session=session, claim=stale, error=error, retry_in=None) is None
        assert lifecycle.fail(session=session, claim=stale, error=error, retry_in=5) is None
    assert shape(task_id) == [(1, 1, "LOST"), (1, 2, "RUNNING")]
    assert all(run.error is None for run in runs(task_id))

    with session_scope() as session:
        assert lifecycle.succeed(session=session, claim=fresh, result={"from": "new"})
    history = runs(task_id)
    assert [(run.delivery, run.outcome, run.worker) for run in history] == [
        (1, RunOutcome.LOST, "old"),
        (2, RunOutcome.SUCCEEDED, "new"),
    ]
    # A message of an attempt that is over makes no run at all.
    with session_scope() as session:
        assert (
            lifecycle.claim(
                session=session, task_id=task_id, attempt=1, worker="x", lease_seconds=5
            )
            is None
        )
    assert len(runs(task_id)) == 2


def test_a_retried_runs_fence_is_its_own_attempt(database: str) -> None:
    task_id = new_task()
    first = claim(task_id)
    with session_scope() as session:
        status = lifecycle.fail(
            session=session, claim=first, error={"type": "E", "message": "m"}, retry_in=0
        )
    assert status is TaskStatus.RETRYING
    second = claim(task_id, attempt=2)
    with session_scope() as session:
        # The first attempt's run cannot write again, not even over its own ended row.
        assert not lifecycle.succeed(session=session, claim=first, result=1)
    assert shape(task_id) == [(1, 1, "FAILED"), (2, 1, "RUNNING")]
    with session_scope() as session:
        assert lifecycle.succeed(session=session, claim=second, result=2)
    assert shape(task_id) == [(1, 1, "FAILED"), (2, 1, "SUCCEEDED")]


def test_the_reaper_ends_the_runs_it_reaps_as_lost(database: str) -> None:
    lost, poison = new_task(), new_task()
    for task_id in (lost, poison):
        claim(task_id)
        expire_lease(task_id)
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == poison).values(deliveries=3))
        session.execute(update(TaskRun).where(TaskRun.task_id == poison).values(delivery=3))

    with session_scope() as session:
        recovery.reap_expired_leases(session=session, max_deliveries=3, hard_limit=lambda _: 3600)

    [requeued] = runs(lost)
    assert requeued.outcome is RunOutcome.LOST
    assert requeued.finished_at is not None
    assert requeued.error is not None
    assert requeued.error.type == "WorkerLost"
    [ended] = runs(poison)
    assert ended.outcome is RunOutcome.LOST
    assert ended.error is not None
    assert ended.error.message == "the worker was lost 3 times running this attempt"
    # The requeued attempt's next run is a row of its own.
    claim(lost)
    assert shape(lost) == [(1, 1, "LOST"), (1, 2, "RUNNING")]


def test_a_cancel_ends_the_running_run(database: str) -> None:
    task_id = new_task()
    run = claim(task_id)
    with session_scope() as session:
        service.cancel(session=session, task_id=task_id, owner=None)

    assert shape(task_id) == [(1, 1, "CANCELLED")]
    with session_scope() as session:
        # The run sees the cancel (its lease is gone): its result changes nothing.
        assert not lifecycle.renew_lease(session=session, claim=run, lease_seconds=30)
        assert not lifecycle.succeed(session=session, claim=run, result=1)
    assert shape(task_id) == [(1, 1, "CANCELLED")]


def test_a_claim_the_database_forgot_gets_its_run_back_from_the_outcome(database: str) -> None:
    task_id = new_task()
    run = claim(task_id, worker="w")
    with session_scope() as session:
        # What a crash leaves of an asynchronously committed claim: neither row.
        session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(status="QUEUED", deliveries=0, lease_expires_at=None)
        )
        session.execute(delete(TaskRun).where(TaskRun.task_id == task_id))

    with session_scope() as session:
        assert lifecycle.succeed(session=session, claim=run, result=1)

    [restored] = runs(task_id)
    assert (restored.attempt, restored.delivery, restored.outcome) == (1, 1, RunOutcome.SUCCEEDED)


# The API: GET /api/v1/tasks/{id}/runs, scoped to the key's owner.


@pytest.fixture
def auth_client(tmp_path: Path, configure: object) -> Iterator[TestClient]:
    configure(base_env(tmp_path / "data", TASKDOCK_AUTH_ENABLED="true"))  # type: ignore[operator]
    migrate_now()
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def new_key(*scopes: Scope, name: str) -> dict[str, str]:
    with session_scope() as session:
        _, plain = keys.create(session=session, name=name, scopes=list(scopes))
    return {"Authorization": f"Bearer {plain}"}


def test_runs_route_lists_oldest_first_for_the_owner_only(auth_client: TestClient) -> None:
    alice = new_key(Scope.SUBMIT, Scope.READ, name="alice")
    bob = new_key(Scope.SUBMIT, Scope.READ, name="bob")
    admin = new_key(Scope.ADMIN, name="ops")
    task_id = auth_client.post(
        "/api/v1/tasks", json={"type": "tests.flaky", "payload": {"fail_times": 1}}, headers=alice
    ).json()["id"]
    path = f"/api/v1/tasks/{task_id}/runs"
    assert auth_client.get(path, headers=alice).json() == {"task_id": task_id, "items": []}
    for attempt in (1, 2):
        execute(
            task_id=uuid.UUID(task_id), attempt=attempt, worker="inproc", settings=get_settings()
        )

    response = auth_client.get(path, headers=alice)

    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [(item["attempt"], item["delivery"], item["outcome"]) for item in items] == [
        (1, 1, "FAILED"),
        (2, 1, "SUCCEEDED"),
    ]
    assert items[0]["error"]["type"] == "FlakyError"
    assert isinstance(items[1]["duration"], float)
    assert auth_client.get(path, headers=admin).json()["items"] == items
    for headers, unknown in ((bob, task_id), (alice, str(uuid.uuid4()))):
        refused = auth_client.get(f"/api/v1/tasks/{unknown}/runs", headers=headers)
        assert refused.status_code == 404
        assert refused.json()["code"] == "task_not_found"
    assert auth_client.get(path).status_code == 401
    assert auth_client.get("/api/v1/tasks/nope/runs", headers=alice).status_code == 422


# Real workers: a run whose worker is SIGKILLed shows as LOST, the next one as it ended.


@pytest.mark.parametrize("kind", ["embedded", "postgres-redis"])
def test_a_killed_workers_run_shows_as_lost(kind: str, tmp_path: Path, configure: object) -> None:
    database = services.scratch_database() if kind != "embedded" else nullcontext()
    with database as url:
        env = backend_env(kind, tmp_path / "data", url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        from app.main import create_app

        with (
            running_stack(env, tmp_path / "logs") as stack,
            TestClient(create_app(), raise_server_exceptions=False) as client,
        ):
            first = stack.worker("w1")
            stack.dispatcher()
            response = client.post(
                "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 2}}
            )
            task_id = response.json()["id"]
            wait_status(client, task_id, {"RUNNING"})
            first.kill()  # SIGKILL to the worker and its pool: no ack, no outcome
            stack.worker("w2")
            done = wait_status(client, task_id, {"SUCCEEDED", "FAILED"}, timeout=60)
            assert done["status"] == "SUCCEEDED", stack.dump_logs()
            items = client.get(f"/api/v1/tasks/{task_id}/runs").json()["items"]

    assert [(item["attempt"], item["delivery"], item["outcome"]) for item in items] == [
        (1, 1, "LOST"),
        (1, 2, "SUCCEEDED"),
    ]
    assert items[0]["worker"].startswith("w1@")
    assert items[0]["finished_at"] is not None
    assert items[1]["worker"].startswith("w2@")
    assert items[1]["duration"] >= 2.0  # the whole sleep ran in the second run
    assert done["deliveries"] == 2
