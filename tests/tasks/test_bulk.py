"""Bulk cancel and retry by filter: validation, owner scope, dry runs, the single routes'
transitions, 10,000 tasks on PostgreSQL, and retried tasks that real workers run again."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.auth import service as keys
from app.auth.service import Scope
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import lifecycle, service
from app.tasks.models import Task, TaskRun
from app.tasks.schemas import TaskCreate
from app.tasks.states import RunOutcome, TaskStatus
from tests.conftest import migrate_now
from tests.support.stack import base_env, running_stack, wait_status

PROCESS = {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}


def counts() -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
    return {str(status): int(count) for status, count in rows}


def set_status(task_ids: list[str], status: TaskStatus) -> None:
    with session_scope() as session:
        session.execute(
            update(Task).where(Task.id.in_([uuid.UUID(i) for i in task_ids])).values(status=status)
        )


def submit(client: TestClient, n: int, body: dict[str, Any] | None = None, **kw: Any) -> list[str]:
    ids = []
    for _ in range(n):
        response = client.post("/api/v1/tasks", json=body or PROCESS, **kw)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    return ids


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"limit": 10}, "body"),  # no criterion at all
        ({"status": ["QUEUED"]}, "limit"),  # no limit
        ({"status": ["QUEUED"], "limit": 0}, "limit"),
        ({"status": ["QUEUED"], "limit": 10_001}, "limit"),
        ({"ids": [], "limit": 10}, "ids"),
        ({"status": [], "limit": 10}, "status"),
        ({"status": ["DONE"], "limit": 10}, "status"),
        ({"type": "", "limit": 10}, "type"),
        ({"queue": "no spaces", "limit": 10}, "queue"),
        ({"created_after": "2026-01-01T00:00:00", "limit": 10}, "created_after"),  # naive
        ({"created_after": 0, "limit": 10}, "created_after"),  # not seconds since 1970
        ({"status": ["QUEUED"], "limit": "10"}, "limit"),
        ({"status": ["QUEUED"], "limit": 10, "dry_run": "yes"}, "dry_run"),
        (
            {
                "created_after": "2026-02-01T00:00:00Z",
                "created_before": "2026-01-01T00:00:00Z",
                "limit": 10,
            },
            "body",
        ),
        ({"status": ["QUEUED"], "limit": 10, "owner": "someone"}, "owner"),
    ],
)
def test_bad_filters_are_422_naming_what_is_wrong(
    embedded_client: TestClient, body: dict[str, Any], where: str
) -> None:
    submit(embedded_client, 2)
    for action in ("cancel", "retry"):
        response = embedded_client.post(f"/api/v1/tasks/{action}", json=body)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"
        assert any(where in error["loc"] for error in response.json()["fields"]), response.json()
    assert counts() == {"QUEUED": 2}


def test_bulk_paths_answer_405_to_other_methods(embedded_client: TestClient) -> None:
    for action in ("cancel", "retry"):
        for method in ("GET", "PUT", "DELETE"):
            response = embedded_client.request(method, f"/api/v1/tasks/{action}")
            assert response.status_code == 405, (method, action, response.text)
            assert response.json()["code"] == "method_not_allowed"
        assert embedded_client.get(f"/api/v1/tasks/{action}").headers["allow"] == "POST"


def test_a_status_the_action_never_takes_is_422(embedded_client: TestClient) -> None:
    submit(embedded_client, 1)
    cancel = embedded_client.post(
        "/api/v1/tasks/cancel", json={"status": ["SUCCEEDED"], "limit": 5}
    )
    retry = embedded_client.post("/api/v1/tasks/retry", json={"status": ["QUEUED"], "limit": 5})

    for response, named in ((cancel, "SUCCEEDED"), (retry, "QUEUED")):
        assert response.status_code == 422, response.text
        assert response.json()["fields"][0]["loc"] == ["body", "status"]
        assert named in response.json()["message"]
    assert counts() == {"QUEUED": 1}


def test_dry_run_counts_and_changes_nothing(embedded_client: TestClient) -> None:
    ids = submit(embedded_client, 5)
    set_status(ids[:2], TaskStatus.SUCCEEDED)

    response = embedded_client.post(
        "/api/v1/tasks/cancel", json={"type": "process_data", "limit": 10, "dry_run": True}
    )
    capped = embedded_client.post(
        "/api/v1/tasks/cancel", json={"type": "process_data", "limit": 2, "dry_run": True}
    )

    assert response.status_code == 200, response.text
    assert response.json() == {"matched": 3, "changed": 0, "dry_run": True, "ids": ids[2:]}
    assert capped.json()["matched"] == 2
    assert counts() == {"SUCCEEDED": 2, "QUEUED": 3}


def test_cancel_by_filter_takes_the_oldest_first_up_to_the_limit(
    embedded_client: TestClient,
) -> None:
    early = submit(embedded_client, 3)
    middle = datetime.now(UTC)
    late = submit(embedded_client, 3)
    other = submit(embedded_client, 2, {"type": "sleep", "payload": {"seconds": 0}})
    set_status([late[2]], TaskStatus.SUCCEEDED)

    first = embedded_client.post(
        "/api/v1/tasks/cancel", json={"type": "process_data", "limit": 2}
    ).json()
    by_range = embedded_client.post(
        "/api/v1/tasks/cancel",
        json={"created_after": middle.isoformat(), "queue": "default", "limit": 100},
    ).json()

    assert first == {"matched": 2, "changed": 2, "dry_run": False, "ids": early[:2]}
    # The finished one is not matched: it is in no state a cancel takes.
    assert set(by_range["ids"]) == {late[0], late[1], *other}
    assert by_range["matched"] == by_range["changed"] == 4
    assert embedded_client.get(f"/api/v1/tasks/{early[2]}").json()["status"] == "QUEUED"
    assert counts() == {"CANCELLED": 6, "QUEUED": 1, "SUCCEEDED": 1}


def test_retry_by_ids_makes_a_new_attempt_of_finished_tasks_only(
    embedded_client: TestClient,
) -> None:
    ids = submit(embedded_client, 4)
    set_status(ids[:2], TaskStatus.FAILED)
    embedded_client.post(f"/api/v1/tasks/{ids[2]}/cancel")

    response = embedded_client.post("/api/v1/tasks/retry", json={"ids": ids, "limit": 10})
    again = embedded_client.post("/api/v1/tasks/retry", json={"ids": ids, "limit": 10})

    assert response.status_code == 200, response.text
    assert response.json() == {"matched": 3, "changed": 3, "dry_run": False, "ids": ids[:3]}
    for task_id in ids[:3]:
        task = embedded_client.get(f"/api/v1/tasks/{task_id}").json()
        assert (task["status"], task["attempt"], task["max_attempts"]) == ("QUEUED", 2, 5)
        assert task["finished_at"] is None
    assert embedded_client.get(f"/api/v1/tasks/{ids[3]}").json()["attempt"] == 1
    # Retried once: they are QUEUED now, and a second request takes none of them.
    assert again.json() == {"matched": 0, "changed": 0, "dry_run": False, "ids": []}


def test_a_bulk_cancel_ends_the_running_runs(embedded_env: dict[str, str]) -> None:
    data = TaskCreate.model_validate(PROCESS)
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
    with session_scope() as session:
        run = lifecycle.claim(
            session=session, task_id=task.id, attempt=1, worker="w", lease_seconds=30
        )
    assert run is not None
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        response = client.post("/api/v1/tasks/cancel", json={"status": ["RUNNING"], "limit": 5})
    assert response.json()["changed"] == 1
    with session_scope() as session:
        outcomes = session.scalars(select(TaskRun.outcome).where(TaskRun.task_id == task.id))
        assert list(outcomes) == [RunOutcome.CANCELLED]
        # The run learns it at its next renewal; its result changes nothing.
        assert not lifecycle.renew_lease(session=session, claim=run, lease_seconds=30)
        assert not lifecycle.succeed(session=session, claim=run, result=1)


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


def test_bulk_actions_take_only_the_keys_own_tasks(auth_client: TestClient) -> None:
    alice = new_key(Scope.SUBMIT, Scope.READ, name="alice")
    bob = new_key(Scope.SUBMIT, Scope.READ, name="bob")
    reader = new_key(Scope.READ, name="reader")
    admin = new_key(Scope.ADMIN, name="ops")
    alices = submit(auth_client, 2, headers=alice)
    bobs = submit(auth_client, 2, headers=bob)

    assert (
        auth_client.post(
            "/api/v1/tasks/cancel", json={"status": ["QUEUED"], "limit": 5}
        ).status_code
        == 401
    )
    assert (
        auth_client.post(
            "/api/v1/tasks/cancel", json={"status": ["QUEUED"], "limit": 5}, headers=reader
        ).status_code
        == 403
    )
    # Bob names Alice's tasks: they are as absent as unknown ones.
    stolen = auth_client.post(
        "/api/v1/tasks/cancel", json={"ids": alices, "limit": 5}, headers=bob
    ).json()
    mine = auth_client.post(
        "/api/v1/tasks/cancel", json={"status": ["QUEUED"], "limit": 5}, headers=bob
    ).json()

    assert (stolen["matched"], stolen["changed"]) == (0, 0)
    assert sorted(mine["ids"]) == sorted(bobs)
    for task_id in alices:
        assert auth_client.get(f"/api/v1/tasks/{task_id}", headers=alice).json()["status"] == (
            "QUEUED"
        )
    # An admin key acts on every owner's tasks, as the single routes let it.
    everyone = auth_client.post(
        "/api/v1/tasks/retry", json={"status": ["CANCELLED"], "limit": 5}, headers=admin
    ).json()
    assert sorted(everyone["ids"]) == sorted(bobs)


# PostgreSQL: 10,000 tasks.


def insert_many(n: int, **values: Any) -> None:
    data = TaskCreate.model_validate(PROCESS)
    rows = []
    for _ in range(n):
        row = service.prepare(data=data, owner="", idempotency_key=None, extra_queues=[])
        row.update(values)
        rows.append(row)
    with session_scope() as session:
        session.execute(service.insert_statement("postgresql"), rows)


@pytest.mark.postgres
def test_ten_thousand_tasks_are_cancelled_and_retried_in_batches(
    pg_env: dict[str, str],
) -> None:
    insert_many(10_000)
    insert_many(5, status=TaskStatus.SUCCEEDED)
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        counted = client.post(
            "/api/v1/tasks/cancel", json={"status": ["QUEUED"], "limit": 10_000, "dry_run": True}
        ).json()
        cancelled = client.post(
            "/api/v1/tasks/cancel", json={"type": "process_data", "limit": 10_000}
        ).json()
        assert counts() == {"CANCELLED": 10_000, "SUCCEEDED": 5}
        part = client.post("/api/v1/tasks/retry", json={"status": ["CANCELLED"], "limit": 1_234})
        rest = client.post("/api/v1/tasks/retry", json={"status": ["CANCELLED"], "limit": 10_000})

    assert counted == {"matched": 10_000, "changed": 0, "dry_run": True, "ids": None}
    assert cancelled == {"matched": 10_000, "changed": 10_000, "dry_run": False, "ids": None}
    assert (part.json()["matched"], part.json()["changed"]) == (1_234, 1_234)
    assert (rest.json()["matched"], rest.json()["changed"]) == (8_766, 8_766)
    assert counts() == {"QUEUED": 10_000, "SUCCEEDED": 5}
    with session_scope() as session:
        attempts = session.execute(
            select(Task.attempt, Task.published_at.is_(None), func.count())
            .where(Task.status == TaskStatus.QUEUED)
            .group_by(Task.attempt, Task.published_at.is_(None))
        ).all()
    # Each a new attempt, waiting in the outbox for the dispatcher.
    assert [tuple(row) for row in attempts] == [(2, True, 10_000)]


@pytest.mark.postgres
def test_bulk_retried_tasks_run_again_on_real_workers(
    pg_env: dict[str, str], tmp_path: Path
) -> None:
    from app.main import create_app

    with (
        running_stack(pg_env, tmp_path / "logs") as stack,
        TestClient(create_app(), raise_server_exceptions=False) as client,
    ):
        ids = submit(client, 20, {"type": "sleep", "payload": {"seconds": 0}})
        # No worker yet: every task still waits, and is cancelled while it does.
        cancelled = client.post("/api/v1/tasks/cancel", json={"ids": ids, "limit": 20}).json()
        assert cancelled["changed"] == 20
        retried = client.post(
            "/api/v1/tasks/retry",
            json={"status": ["CANCELLED"], "type": "sleep", "limit": 20},
        ).json()
        assert retried["changed"] == 20
        stack.worker()
        stack.dispatcher()
        done = [wait_status(client, task_id, {"SUCCEEDED", "FAILED"}) for task_id in ids]
        history = client.get(f"/api/v1/tasks/{ids[0]}/runs").json()["items"]

    assert {task["status"] for task in done} == {"SUCCEEDED"}, stack.dump_logs()
    assert {task["attempt"] for task in done} == {2}
    assert [(run["attempt"], run["outcome"]) for run in history] == [(2, "SUCCEEDED")]


def test_created_range_is_read_in_utc(embedded_client: TestClient) -> None:
    ids = submit(embedded_client, 2)
    later = (datetime.now(UTC) + timedelta(hours=1)).astimezone().isoformat()
    response = embedded_client.post(
        "/api/v1/tasks/cancel", json={"created_before": later, "limit": 10, "dry_run": True}
    )
    assert response.json()["ids"] == ids


def test_a_bulk_retried_task_owes_the_webhook_of_its_new_end(embedded_client: TestClient) -> None:
    # As the single retry: the new attempt's end gets its own delivery (app/webhooks).
    ids = submit(embedded_client, 1)
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.id == uuid.UUID(ids[0]))
            .values(status=TaskStatus.FAILED, notified_at=utcnow())
        )

    response = embedded_client.post("/api/v1/tasks/retry", json={"ids": ids, "limit": 1})

    assert response.json()["changed"] == 1
    with session_scope() as session:
        assert session.get(Task, uuid.UUID(ids[0])).notified_at is None  # type: ignore[union-attr]
