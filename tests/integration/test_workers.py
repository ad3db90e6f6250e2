"""The whole system with real Celery workers, on every backend:
SQLite + filesystem broker, PostgreSQL + Redis, PostgreSQL + RabbitMQ."""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from kombu import Connection
from sqlalchemy import func, select

from app.core.config import get_settings
from app.core.db import session_scope
from app.tasks import service
from app.tasks.models import Task
from app.tasks.schemas import TaskCreate
from tests.support.services import celery_app, wait_for
from tests.support.stack import Stack, running_stack, wait_status

pytestmark = pytest.mark.slow

FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}


def submit(client: Any, body: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = client.post("/api/v1/tasks", json=body, **kwargs)
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_submit_runs_to_succeeded(stack: Stack, client: TestClient) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(client, {"type": "process_data", "payload": {"user_id": 3, "data": "a  b c"}})

    done = wait_status(client, task["id"], FINISHED)

    assert done["status"] == "SUCCEEDED", done
    assert done["result"]["processed"] == "A B C"
    assert done["result"]["words"] == 3
    assert done["deliveries"] == 1
    assert done["started_at"] <= done["finished_at"]
    assert done["queued_at"] is not None


@pytest.mark.parametrize("backend", ["postgres-redis", "postgres-rabbitmq"], indirect=True)
def test_the_dispatcher_alone_publishes_woken_by_the_commit(stack: Stack) -> None:
    # Its scans are a minute apart: within the wait below, only the commit's notification
    # can have made it publish.
    stack.env.update(TASKDOCK_PUBLISH_ON_SUBMIT="false", TASKDOCK_DISPATCHER_INTERVAL="60")
    heartbeat = Path(stack.env["TASKDOCK_DISPATCHER_HEARTBEAT_FILE"])
    heartbeat.unlink(missing_ok=True)
    stack.worker()
    dispatcher = stack.dispatcher()
    wait_for(heartbeat.exists, timeout=60, what="the dispatcher's first scan")
    _, base = stack.api()

    with httpx.Client(base_url=base, timeout=10) as http:
        task = submit(http, {"type": "process_data", "payload": {"user_id": 3, "data": "n"}})
        assert task["queued_at"] is None  # the API left it to the dispatcher
        done = wait_status(http, task["id"], FINISHED, timeout=30)

    assert done["status"] == "SUCCEEDED", stack.dump_logs()
    assert done["queued_at"] is not None
    assert dispatcher.alive(), dispatcher.output()[-3000:]


def test_failure_is_recorded_with_the_error(stack: Stack, client: TestClient) -> None:
    stack.worker()
    task = submit(client, {"type": "tests.no_retry", "payload": {}})

    done = wait_status(client, task["id"], FINISHED)

    assert done["status"] == "FAILED"
    assert done["attempt"] == 1  # not in retry_on: no second attempt
    assert done["error"]["type"] == "NoRetryError"
    assert done["error"]["message"] == "not retryable"
    assert "Traceback" in done["error"]["traceback"]


def test_invalid_output_fails_without_retry(stack: Stack, client: TestClient) -> None:
    stack.worker()
    task = submit(client, {"type": "tests.bad_output", "payload": {}})

    done = wait_status(client, task["id"], FINISHED)

    assert done["status"] == "FAILED"
    assert done["error"]["type"] == "ValidationError"
    assert done["attempt"] == 1


def test_retry_policy_runs_again_until_success(stack: Stack, client: TestClient) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(client, {"type": "tests.flaky", "payload": {"fail_times": 2}})

    done = wait_status(client, task["id"], FINISHED)

    assert done["status"] == "SUCCEEDED", done
    assert done["attempt"] == 3
    assert done["result"] == {"attempt": 3}


def test_retry_policy_gives_up_after_max_retries(stack: Stack, client: TestClient) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(client, {"type": "tests.flaky", "payload": {"fail_times": 9}})

    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = client.get(f"/api/v1/tasks/{task['id']}").json()
        seen.add(current["status"])
        if current["status"] in FINISHED:
            break
        time.sleep(0.05)

    assert current["status"] == "FAILED"
    assert current["attempt"] == current["max_attempts"] == 3
    assert current["error"]["type"] == "FlakyError"
    assert current["error"]["message"] == "failing attempt 3"
    assert "RETRYING" in seen


def test_cancel_running_task(stack: Stack, client: TestClient) -> None:
    stack.worker(concurrency=1)
    stack.dispatcher()
    task = submit(client, {"type": "sleep", "payload": {"seconds": 60}})
    wait_status(client, task["id"], {"RUNNING"})

    response = client.post(f"/api/v1/tasks/{task['id']}/cancel")

    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    # The single pool slot is freed: the next task runs long before the sleep would end.
    after = submit(client, {"type": "process_data", "payload": {"user_id": 1, "data": "x"}})
    assert wait_status(client, after["id"], FINISHED, timeout=20)["status"] == "SUCCEEDED"
    final = client.get(f"/api/v1/tasks/{task['id']}").json()
    assert final["status"] == "CANCELLED"
    assert final["result"] is None


def test_idempotency_under_concurrent_repeats(stack: Stack, backend: dict[str, str]) -> None:
    _, base = stack.api(workers=2)
    body = {"type": "process_data", "payload": {"user_id": 9, "data": "once"}}
    key = f"concurrent-{uuid.uuid4()}"

    def post(_: int) -> httpx.Response:
        return httpx.post(
            f"{base}/api/v1/tasks", json=body, headers={"Idempotency-Key": key}, timeout=30
        )

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(post, range(20)))

    codes = sorted(response.status_code for response in responses)
    assert codes == [200] * 19 + [202], [r.text for r in responses if r.status_code >= 300]
    assert len({response.json()["id"] for response in responses}) == 1
    with session_scope() as session:
        count = session.scalar(
            select(func.count()).select_from(Task).where(Task.idempotency_key == key)
        )
    assert count == 1


def test_countdown_is_held_in_the_database_until_due(stack: Stack, client: TestClient) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(
        client,
        {"type": "process_data", "payload": {"user_id": 1, "data": "later"}, "countdown": 3},
    )

    time.sleep(1.5)
    early = client.get(f"/api/v1/tasks/{task['id']}").json()
    assert early["status"] == "QUEUED"
    assert early["queued_at"] is None  # not on the broker: nothing there to redeliver in a loop
    done = wait_status(client, task["id"], FINISHED, timeout=20)

    assert done["status"] == "SUCCEEDED"
    assert done["deliveries"] == 1
    assert done["started_at"] >= task["run_after"]


def test_pickled_message_is_refused(stack: Stack, client: TestClient) -> None:
    worker = stack.worker()
    # A due record nobody has published; only a pickled message for it reaches the queue.
    data = TaskCreate.model_validate(
        {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
    )
    with session_scope() as session:
        task, _ = service.submit(
            session=session, data=data, owner="", idempotency_key=None, extra_queues=[]
        )
        task_id = str(task.id)
    settings = get_settings()
    with Connection(
        settings.celery_broker_url,
        transport=celery_app().conf.broker_transport,
        transport_options=dict(stack_transport_options()),
    ) as connection:
        connection.Producer(serializer="pickle").publish(
            [[task_id, 1], {}, {"callbacks": None, "errbacks": None, "chain": None}],
            routing_key="default",
            exchange="",
            headers={"task": "taskdock.execute", "id": f"{task_id}.1", "lang": "py"},
            declare=[],
            serializer="pickle",
        )

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "pickle" not in worker.output():
        time.sleep(0.2)

    assert "pickle" in worker.output()
    assert "ContentDisallowed" in worker.output() or "Refusing" in worker.output()
    current = client.get(f"/api/v1/tasks/{task_id}").json()
    assert current["status"] == "QUEUED"  # due, yet never run: the message was refused
    assert current["deliveries"] == 0


def stack_transport_options() -> dict[str, Any]:
    from app.core.celery import broker_options

    return broker_options(get_settings())


def test_worker_finishes_its_task_on_sigterm(stack: Stack, client: TestClient) -> None:
    worker = stack.worker()
    task = submit(client, {"type": "sleep", "payload": {"seconds": 2}})
    wait_status(client, task["id"], {"RUNNING"})

    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    code = worker.process.wait(timeout=30)

    assert code == 0, worker.output()[-3000:]
    done = client.get(f"/api/v1/tasks/{task['id']}").json()
    assert done["status"] == "SUCCEEDED"
    assert done["deliveries"] == 1


def test_plain_celery_command_runs_tasks_of_every_queue(
    embedded_env: dict[str, str], embedded_client: TestClient, tmp_path: Path
) -> None:
    """Without -Q a worker consumes every registered queue, not only `default`."""
    heartbeat = tmp_path / "celery.heartbeat"
    with running_stack(embedded_env, tmp_path / "logs") as stack:
        stack.spawn(
            "celery",
            [sys.executable, "-m", "celery", "-A", "app.worker", "worker", "--concurrency", "1"],
            env={**embedded_env, "TASKDOCK_WORKER_HEARTBEAT_FILE": str(heartbeat)},
        )
        wait_for(heartbeat.exists, timeout=60, what="the celery worker to consume")
        task = submit(
            embedded_client, {"type": "process_data", "payload": {"user_id": 5, "data": "x"}}
        )
        side = submit(embedded_client, {"type": "tests.side", "payload": {"value": 3}})

        assert wait_status(embedded_client, task["id"], FINISHED)["status"] == "SUCCEEDED"
        done = wait_status(embedded_client, side["id"], FINISHED)
        assert (done["queue"], done["status"], done["result"]) == (
            "side",
            "SUCCEEDED",
            {"value": 3},
        )


def test_request_id_reaches_every_worker_log_line(stack: Stack, client: TestClient) -> None:
    worker = stack.worker()
    stack.dispatcher()
    response = client.post(
        "/api/v1/tasks",
        json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}},
        headers={"X-Request-ID": "trace-me-1"},
    )
    task_id = response.json()["id"]
    wait_status(client, task_id, FINISHED)
    worker.stop()

    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("task_id") == task_id]
    assert {line["message"] for line in mine} >= {"task started", "task succeeded"}
    assert all(line.get("request_id") == "trace-me-1" for line in mine), mine
    assert all(line.get("task_type") == "process_data" for line in mine if "task_type" in line)


def test_failed_task_retried_by_hand_succeeds(stack: Stack, client: TestClient) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(client, {"type": "tests.flaky", "payload": {"fail_times": 3}})
    failed = wait_status(client, task["id"], FINISHED)
    assert (failed["status"], failed["attempt"]) == ("FAILED", 3)

    response = client.post(f"/api/v1/tasks/{task['id']}/retry")

    assert response.status_code == 202
    done = wait_status(client, task["id"], FINISHED)
    assert done["status"] == "SUCCEEDED"
    assert done["attempt"] == 4
    assert done["result"] == {"attempt": 4}
    assert done["error"] is None


def test_soft_time_limit_is_recorded_as_the_failure(stack: Stack, client: TestClient) -> None:
    stack.worker()
    task = submit(client, {"type": "tests.slow", "payload": {"seconds": 30}})

    done = wait_status(client, task["id"], FINISHED)

    assert done["status"] == "FAILED"
    assert done["error"]["type"] == "SoftTimeLimitExceeded"
    assert done["deliveries"] == 1


def test_hard_time_limit_ends_the_task_once(
    embedded_env: dict[str, str], embedded_client: TestClient, tmp_path: Path
) -> None:
    with running_stack(embedded_env, tmp_path / "logs") as stack:
        stack.worker()
        stack.dispatcher()
        task = submit(
            embedded_client,
            {"type": "tests.slow", "payload": {"seconds": 60, "ignore_soft_limit": True}},
        )

        done = wait_status(embedded_client, task["id"], FINISHED, timeout=60)

    assert done["status"] == "FAILED"
    assert done["error"]["type"] == "TimeLimitExceeded"
    assert done["deliveries"] == 1  # killed once, never handed out again


@pytest.mark.parametrize("kind", ["bytes", "nan"])
def test_a_result_that_cannot_be_stored_fails_at_once_with_the_real_error(
    stack: Stack, client: TestClient, kind: str
) -> None:
    """Before, the finish write raised outside any handler and the record stayed RUNNING until
    the reaper ended it, three runs later, as WorkerLost."""
    stack.worker()
    task = submit(client, {"type": "tests.unstorable", "payload": {"kind": kind}})

    done = wait_status(client, task["id"], FINISHED, timeout=20)

    assert done["status"] == "FAILED", done
    assert (done["attempt"], done["deliveries"]) == (1, 1)
    expected = {"bytes": ("TypeError", "bytes"), "nan": ("ValueError", "Out of range float")}
    assert done["error"]["type"] == expected[kind][0]
    assert done["error"]["message"].startswith("the result cannot be stored: ")
    assert expected[kind][1] in done["error"]["message"]


def test_a_tasks_own_validation_error_follows_its_retry_policy(
    stack: Stack, client: TestClient
) -> None:
    stack.worker()
    stack.dispatcher()
    task = submit(client, {"type": "tests.validates_fetched", "payload": {}})

    done = wait_status(client, task["id"], FINISHED, timeout=30)

    assert done["status"] == "FAILED"
    assert done["error"]["type"] == "ValidationError"
    assert done["attempt"] == 4  # max_retries=3: every run, not only the first
