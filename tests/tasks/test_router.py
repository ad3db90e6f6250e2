"""Every endpoint and every error case, on every backend (the broker-level checks on the
embedded one, whose queue is a folder this test owns)."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from app.core import metrics
from app.core.db import get_engine, session_scope
from app.tasks.models import Task

OVERFLOWING_CURSOR = (
    base64.urlsafe_b64encode(f"9999-12-31T23:59:59-10:00|{uuid.UUID(int=0)}".encode())
    .decode()
    .rstrip("=")
)
PROCESS = {"type": "process_data", "payload": {"user_id": 7, "data": "hello  world"}}


def count_tasks() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Task)) or 0)


def queued_messages(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["TASKDOCK_DATA_DIR"]) / "broker" / "queue").glob("*.msg"))


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str)
    assert body["message"]
    assert "Traceback" not in response.text
    return dict(body)


def test_submit_records_then_publishes(
    embedded_client: TestClient, embedded_env: dict[str, str]
) -> None:
    response = embedded_client.post("/api/v1/tasks", json=PROCESS)

    assert response.status_code == 202, response.text
    task = response.json()
    assert response.headers["location"] == f"/api/v1/tasks/{task['id']}"
    assert task["status"] == "QUEUED"
    assert task["attempt"] == 1
    assert task["max_attempts"] == 4
    assert task["payload"] == PROCESS["payload"]
    assert task["queue"] == "default"
    with session_scope() as session:
        row = session.get(Task, uuid.UUID(task["id"]))
        assert row is not None
        assert row.published_at is not None  # the broker was told, after the commit
    messages = queued_messages(embedded_env)
    assert len(messages) == 1
    body = json.loads(messages[0].read_text())
    # One job runs every type; monitoring tools show the type's name and the taskdock id.
    assert body["headers"]["task"] == "taskdock.execute"
    assert body["headers"]["shadow"] == "process_data"
    assert body["headers"]["id"] == f"{task['id']}.1"
    assert body["headers"]["kwargsrepr"] == repr({"task_id": task["id"], "attempt": 1})
    args, kwargs, _ = json.loads(base64.b64decode(body["body"]))
    assert (args, kwargs) == ([], {"task_id": task["id"], "attempt": 1})  # never the payload


def test_submit_unknown_type_is_422_naming_it(client: TestClient) -> None:
    response = client.post("/api/v1/tasks", json={"type": "no_such_type", "payload": {}})

    body = assert_error(response, 422, "unknown_task_type")
    assert "no_such_type" in body["message"]
    assert body["fields"][0]["loc"] == ["body", "type"]
    assert count_tasks() == 0


def test_submit_invalid_payload_names_the_field(client: TestClient) -> None:
    response = client.post(
        "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": "x", "data": 3}}
    )

    body = assert_error(response, 422, "validation_error")
    locations = {tuple(field["loc"]) for field in body["fields"]}
    assert ("body", "payload", "user_id") in locations
    assert ("body", "payload", "data") in locations
    assert count_tasks() == 0


@pytest.mark.parametrize("field", ["status", "attempt", "owner", "result"])
def test_clients_cannot_set_server_fields(client: TestClient, field: str) -> None:
    response = client.post("/api/v1/tasks", json={**PROCESS, field: "SUCCEEDED"})

    body = assert_error(response, 422, "validation_error")
    assert ["body", field] in [error["loc"] for error in body["fields"]]
    assert count_tasks() == 0


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ({"countdown": 5, "eta": "2001-01-01T00:00:00Z"}, ["body"]),
        ({"eta": "2030-01-01T00:00:00"}, ["body", "eta"]),
        ({"countdown": -1}, ["body", "countdown"]),
        ({"priority": 10}, ["body", "priority"]),
        ({"queue": "bad queue!"}, ["body", "queue"]),
        ({"queue": "no-worker-consumes-this"}, ["body", "queue"]),
        ({"eta": "9999-12-31T23:59:59-10:00"}, ["body", "eta"]),
    ],
)
def test_schedule_and_routing_are_validated(
    client: TestClient, extra: dict[str, Any], where: list[str]
) -> None:
    response = client.post("/api/v1/tasks", json={**PROCESS, **extra})

    assert response.status_code == 422, response.text
    assert where in [error["loc"] for error in response.json()["fields"]]
    assert count_tasks() == 0


def test_not_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/api/v1/tasks", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "validation_error")


def test_countdown_holds_the_task_in_the_database(
    embedded_client: TestClient, embedded_env: dict[str, str]
) -> None:
    before = datetime.now(UTC)
    response = embedded_client.post("/api/v1/tasks", json={**PROCESS, "countdown": 3600})

    assert response.status_code == 202
    task = response.json()
    run_after = datetime.fromisoformat(task["run_after"])
    assert run_after >= before + timedelta(seconds=3599)
    assert queued_messages(embedded_env) == []  # nothing on the broker until it is due
    assert task["queued_at"] is None


def test_eta_in_the_past_runs_now(
    embedded_client: TestClient, embedded_env: dict[str, str]
) -> None:
    response = embedded_client.post(
        "/api/v1/tasks", json={**PROCESS, "eta": "2001-01-01T00:00:00+00:00"}
    )

    assert response.status_code == 202
    assert len(queued_messages(embedded_env)) == 1


def test_idempotency_key_returns_the_first_task(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/api/v1/tasks", json=PROCESS, headers=headers)
    again = client.post("/api/v1/tasks", json=PROCESS, headers=headers)

    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert count_tasks() == 1


def test_idempotency_key_with_another_body_is_409(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-43"}
    first = client.post("/api/v1/tasks", json=PROCESS, headers=headers)
    other = client.post(
        "/api/v1/tasks",
        json={"type": "process_data", "payload": {"user_id": 8, "data": "else"}},
        headers=headers,
    )

    assert first.status_code == 202
    body = assert_error(other, 409, "idempotency_conflict")
    assert body["task_id"] == first.json()["id"]
    assert count_tasks() == 1


def test_get_task(client: TestClient) -> None:
    created = client.post("/api/v1/tasks", json=PROCESS).json()

    response = client.get(f"/api/v1/tasks/{created['id']}")

    assert response.status_code == 200
    assert response.json()["id"] == created["id"]
    assert response.json()["status"] == "QUEUED"


def test_unknown_task_is_404_never_pending(client: TestClient) -> None:
    response = client.get(f"/api/v1/tasks/{uuid.uuid4()}")
    assert_error(response, 404, "task_not_found")


def test_malformed_task_id_is_422(client: TestClient) -> None:
    body = assert_error(client.get("/api/v1/tasks/not-a-uuid"), 422, "validation_error")
    assert body["fields"][0]["loc"] == ["path", "task_id"]


@pytest.fixture
def five_tasks(client: TestClient) -> list[str]:
    ids = []
    for index in range(5):
        body = (
            {"type": "sleep", "payload": {"seconds": 0}}
            if index % 2
            else {"type": "process_data", "payload": {"user_id": index, "data": "x"}}
        )
        ids.append(client.post("/api/v1/tasks", json=body).json()["id"])
        time.sleep(0.002)
    return ids


def test_list_newest_first_with_cursor(client: TestClient, five_tasks: list[str]) -> None:
    first = client.get("/api/v1/tasks", params={"limit": 2}).json()
    second = client.get("/api/v1/tasks", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    third = client.get("/api/v1/tasks", params={"limit": 2, "cursor": second["next_cursor"]}).json()

    seen = [item["id"] for page in (first, second, third) for item in page["items"]]
    assert seen == list(reversed(five_tasks))
    assert third["next_cursor"] is None


def test_list_filters_by_type_and_status(client: TestClient, five_tasks: list[str]) -> None:
    client.post(f"/api/v1/tasks/{five_tasks[0]}/cancel")

    sleeps = client.get("/api/v1/tasks", params={"type": "sleep"}).json()["items"]
    cancelled = client.get("/api/v1/tasks", params={"status": "CANCELLED"}).json()["items"]

    assert {item["id"] for item in sleeps} == {five_tasks[1], five_tasks[3]}
    assert [item["id"] for item in cancelled] == [five_tasks[0]]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 201},
        {"status": "PENDING"},
        {"cursor": "%%%"},
        {"cursor": "bm9wZQ"},
        {"type": "a\x00b"},
        # A cursor whose timestamp overflows when converted to UTC.
        {"cursor": OVERFLOWING_CURSOR},
    ],
)
def test_list_rejects_bad_parameters(client: TestClient, params: dict[str, Any]) -> None:
    assert_error(client.get("/api/v1/tasks", params=params), 422, "validation_error")


def test_cancel_queued_task(client: TestClient) -> None:
    task = client.post("/api/v1/tasks", json=PROCESS).json()

    response = client.post(f"/api/v1/tasks/{task['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    assert response.json()["finished_at"] is not None
    assert client.get(f"/api/v1/tasks/{task['id']}").json()["status"] == "CANCELLED"


def test_cancel_finished_task_is_409(client: TestClient) -> None:
    task = client.post("/api/v1/tasks", json=PROCESS).json()
    client.post(f"/api/v1/tasks/{task['id']}/cancel")

    body = assert_error(client.post(f"/api/v1/tasks/{task['id']}/cancel"), 409, "task_finished")
    assert body["status"] == "CANCELLED"


def test_cancel_and_retry_unknown_task_is_404(client: TestClient) -> None:
    missing = uuid.uuid4()
    assert_error(client.post(f"/api/v1/tasks/{missing}/cancel"), 404, "task_not_found")
    assert_error(client.post(f"/api/v1/tasks/{missing}/retry"), 404, "task_not_found")


def test_retry_cancelled_task_is_a_new_attempt(
    embedded_client: TestClient, embedded_env: dict[str, str]
) -> None:
    task = embedded_client.post("/api/v1/tasks", json=PROCESS).json()
    embedded_client.post(f"/api/v1/tasks/{task['id']}/cancel")

    response = embedded_client.post(f"/api/v1/tasks/{task['id']}/retry")

    assert response.status_code == 202
    retried = response.json()
    assert retried["status"] == "QUEUED"
    assert retried["attempt"] == 2
    assert retried["max_attempts"] == 5
    assert retried["finished_at"] is None
    attempts = sorted(
        json.loads(path.read_text())["headers"]["id"] for path in queued_messages(embedded_env)
    )
    assert attempts == [f"{task['id']}.1", f"{task['id']}.2"]


def test_retry_unfinished_task_is_409(client: TestClient) -> None:
    task = client.post("/api/v1/tasks", json=PROCESS).json()
    assert_error(client.post(f"/api/v1/tasks/{task['id']}/retry"), 409, "illegal_transition")


def test_task_types_list_schemas(client: TestClient) -> None:
    types = {item["name"]: item for item in client.get("/api/v1/task-types").json()}

    assert {"process_data", "sleep"} <= set(types)
    process = types["process_data"]
    assert set(process["input_schema"]["properties"]) == {"user_id", "data"}
    assert process["input_schema"]["required"] == ["user_id", "data"]
    assert "sha256" in process["output_schema"]["properties"]


def test_body_over_limit_is_413_before_reading(client: TestClient) -> None:
    big = {"type": "process_data", "payload": {"user_id": 1, "data": "x" * (1024 * 1024 + 1)}}
    response = client.post("/api/v1/tasks", json=big)

    assert_error(response, 413, "payload_too_large")
    assert count_tasks() == 0


def test_chunked_body_over_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"type": "process_data", "payload": {"user_id": 1, "data": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}}'

    response = client.post(
        "/api/v1/tasks", content=chunks(), headers={"content-type": "application/json"}
    )

    assert_error(response, 413, "payload_too_large")
    assert count_tasks() == 0


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/api/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/api/v1/tasks"), 405, "method_not_allowed")


def test_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/redoc").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "/api/v1/tasks" in schema["paths"]
    assert "/api/v1/tasks/{task_id}/cancel" in schema["paths"]


def api_engine(client: TestClient) -> Engine:
    """The engine the API's requests use: asyncio on PostgreSQL (made by the first request)."""
    client.get("/api/v1/tasks")
    database = client.app.state.database  # type: ignore[attr-defined]
    return database.engine.sync_engine if database.engine is not None else get_engine()


def statement_counts() -> dict[str, float]:
    counts = dict.fromkeys(("insert", "update", "delete"), 0.0)
    for family in metrics.DB_QUERY_SECONDS.collect():
        for sample in family.samples:
            if sample.name.endswith("_count") and sample.labels["statement"] in counts:
                counts[sample.labels["statement"]] = sample.value
    return counts


def test_submit_is_one_write_and_the_answer_says_the_broker_was_told(
    client: TestClient,
) -> None:
    # Every statement the API sends is counted by kind, through SQLAlchemy or psycopg alike.
    before = statement_counts()
    task = client.post("/api/v1/tasks", json=PROCESS).json()
    after = statement_counts()

    # The insert records the publication it is about to make: no second write after it.
    writes = {kind: after[kind] - before[kind] for kind in ("insert", "update", "delete")}
    assert writes == {"insert": 1, "update": 0, "delete": 0}
    assert task["queued_at"] is not None
    # Committed before the answer: another connection sees it.
    with session_scope() as session:
        row = session.get(Task, uuid.UUID(task["id"]))
        assert row is not None
        assert row.published_at is not None
    assert client.get(f"/api/v1/tasks/{task['id']}").json()["queued_at"] == task["queued_at"]


def test_request_id_is_generated_or_echoed(client: TestClient) -> None:
    generated = client.get("/health/live").headers["x-request-id"]
    echoed = client.get("/health/live", headers={"X-Request-ID": "req-42.a:b"})
    forged = client.get("/health/live", headers={"X-Request-ID": 'bad"\nid'})

    assert len(generated) == 32
    assert echoed.headers["x-request-id"] == "req-42.a:b"
    assert forged.headers["x-request-id"] != 'bad"\nid'
    assert len(forged.headers["x-request-id"]) == 32


def test_request_id_is_kept_on_the_record(client: TestClient) -> None:
    response = client.post("/api/v1/tasks", json=PROCESS, headers={"X-Request-ID": "req-77"})

    with session_scope() as session:
        row = session.get(Task, uuid.UUID(response.json()["id"]))
        assert row is not None
        assert row.request_id == "req-77"


def test_health_names_the_broker_in_use(client: TestClient, backend: dict[str, str]) -> None:
    expected = {"redis": "redis", "amqp": "rabbitmq"}.get(
        backend.get("TASKDOCK_BROKER_URL", "").split("://")[0], "broker"
    )

    body = client.get("/health/ready").json()

    assert body == {"status": "ok", "db": True, expected: True}
