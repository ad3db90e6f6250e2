"""A result over TASKDOCK_RESULT_MAX_BYTES fails its run at once, on both databases."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from app.core.config import get_settings
from app.core.db import session_scope
from app.tasks import service
from app.tasks.models import Task
from app.tasks.schemas import TaskCreate
from app.tasks.states import TaskStatus
from app.worker.runner import Outcome, execute

MIB = 1024 * 1024


@pytest.fixture(params=["embedded", "postgres"])
def database(request: pytest.FixtureRequest) -> dict[str, str]:
    env: dict[str, str] = request.getfixturevalue(
        "embedded_env" if request.param == "embedded" else "pg_env"
    )
    return env


def submit(type_: str, payload: dict[str, Any]) -> uuid.UUID:
    data = TaskCreate.model_validate({"type": type_, "payload": payload})
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
        return task.id


def record(task_id: uuid.UUID) -> Task:
    with session_scope() as session:
        task = session.get(Task, task_id)
        assert task is not None
        return task


def run(task_id: uuid.UUID) -> Outcome:
    return execute(task_id=task_id, attempt=1, worker="test", settings=get_settings()).outcome


def test_a_result_over_the_limit_fails_at_once(database: dict[str, str]) -> None:
    # tests.big_result's policy retries every exception; this one is final all the same.
    task_id = submit("tests.big_result", {"size": 2 * MIB})

    assert run(task_id) is Outcome.FAILED

    task = record(task_id)
    assert task.status is TaskStatus.FAILED
    assert task.attempt == 1
    assert task.result is None
    assert task.error is not None
    assert task.error["type"] == "ResultTooLarge"
    assert "TASKDOCK_RESULT_MAX_BYTES" in task.error["message"]
    encoded = 2 * MIB + len('{"data": ""}')
    assert f"the result is {encoded:,} bytes of JSON" in task.error["message"]


def test_a_result_within_the_limit_is_stored_whole(database: dict[str, str]) -> None:
    size = MIB - 100  # its JSON just under 1 MiB
    task_id = submit("tests.big_result", {"size": size})

    assert run(task_id) is Outcome.SUCCEEDED

    task = record(task_id)
    assert task.status is TaskStatus.SUCCEEDED
    assert task.result == {"data": "x" * size}


def test_the_limit_is_a_setting(database: dict[str, str], configure: object) -> None:
    configure({**database, "TASKDOCK_RESULT_MAX_BYTES": "2048"})  # type: ignore[operator]
    small = submit("tests.big_result", {"size": 2000})
    large = submit("tests.big_result", {"size": 2100})

    assert run(small) is Outcome.SUCCEEDED
    assert run(large) is Outcome.FAILED
    assert record(large).error["type"] == "ResultTooLarge"  # type: ignore[index]


@pytest.mark.parametrize("kind", ["nan", "bytes"])
def test_a_result_json_cannot_hold_still_fails_clearly(database: dict[str, str], kind: str) -> None:
    # Encoded once, before the write: refused there as it was by the write.
    task_id = submit("tests.unstorable", {"kind": kind})
    assert run(task_id) is Outcome.FAILED
    error = record(task_id).error
    assert error is not None
    assert error["message"].startswith("the result cannot be stored")
