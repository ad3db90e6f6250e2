"""Flower, as a Celery user opens it: a real worker with events on, a real Flower, the real API.

Each task shows under its task type's name with its taskdock id, and its Celery state says what
the record says: SUCCEEDED is SUCCESS, FAILED is FAILURE with the error, a failed attempt that
runs again is RETRY.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import backend_env, migrate_now
from tests.support import services
from tests.support.services import free_port, wait_for
from tests.support.stack import Stack, running_stack, wait_status

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

AUTH = ("flower", "test-password")
FINISHED = {"SUCCEEDED", "FAILED"}


@pytest.fixture
def events_env(tmp_path: Path, configure: object) -> Iterator[dict[str, str]]:
    with services.scratch_database() as url:
        env = backend_env("postgres-redis", tmp_path / "data", url, TASKDOCK_WORKER_EVENTS="true")
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env


def start_flower(stack: Stack) -> httpx.Client:
    port = free_port()
    proc = stack.spawn(
        "flower",
        [
            sys.executable, "-m", "celery", "-A", "app.worker", "flower",
            "--address=127.0.0.1", f"--port={port}", f"--basic-auth={AUTH[0]}:{AUTH[1]}",
            # Flower would switch the workers' events on itself; here only the setting does.
            "--enable_events=False",
        ],
    )  # fmt: skip
    flower = httpx.Client(base_url=f"http://127.0.0.1:{port}", auth=AUTH, timeout=5)

    def up() -> bool:
        assert proc.alive(), proc.output()[-3000:]
        try:
            return flower.get("/healthcheck").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=30, what="flower")
    return flower


def submit(api: httpx.Client, type_: str, payload: dict[str, Any]) -> str:
    response = api.post("/api/v1/tasks", json={"type": type_, "payload": payload})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def seen(flower: httpx.Client, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Flower's tasks of these taskdock tasks, by Celery id (`<taskdock id>.<attempt>`)."""
    response = flower.get("/api/tasks")
    assert response.status_code == 200, response.text
    return {
        celery_id: task
        for celery_id, task in response.json().items()
        if celery_id.rsplit(".", 1)[0] in ids
    }


def listening(flower: httpx.Client, api: httpx.Client) -> None:
    """Events sent before Flower subscribed are gone: wait until one task shows up there."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = submit(api, "process_data", {"user_id": 0, "data": "probe"})
        probe_deadline = time.monotonic() + 3
        while time.monotonic() < probe_deadline:
            if seen(flower, [probe]):
                return
            time.sleep(0.2)
    raise AssertionError("flower saw no task event within 30 s")


def test_flower_shows_each_task_under_its_type_with_the_records_outcome(
    events_env: dict[str, str], tmp_path: Path
) -> None:
    with running_stack(events_env, tmp_path / "logs") as stack:
        worker = stack.worker(concurrency=2)
        stack.dispatcher()  # publishes the retried attempt
        _, base = stack.api()
        flower = start_flower(stack)
        with httpx.Client(base_url=base, timeout=10) as api:
            listening(flower, api)

            succeeding = [
                submit(api, "process_data", {"user_id": n, "data": f"x {n}"}) for n in range(3)
            ]
            failing = [submit(api, "tests.no_retry", {}) for _ in range(2)]
            retried = submit(api, "tests.flaky", {"fail_times": 1})
            ids = [*succeeding, *failing, retried]
            records = {task_id: wait_status(api, task_id, FINISHED) for task_id in ids}

            expected = Counter(
                {
                    ("process_data", "SUCCESS"): 3,
                    ("tests.no_retry", "FAILURE"): 2,
                    ("tests.flaky", "RETRY"): 1,
                    ("tests.flaky", "SUCCESS"): 1,
                }
            )

            def settled() -> bool:
                tasks = seen(flower, ids)
                return Counter((t["name"], t["state"]) for t in tasks.values()) == expected

            try:
                wait_for(settled, timeout=30, what="flower to show every outcome")
            except AssertionError:
                pytest.fail(f"flower shows {seen(flower, ids)}\n{stack.dump_logs()}")
            tasks = seen(flower, ids)
            types = flower.get("/api/task/types").json()["task-types"]
            failed = flower.get(f"/api/task/info/{failing[0]}.1").json()
            found = flower.get("/api/tasks", params={"search": retried}).json()

        worker_log = worker.output()

    # The records are the truth, and Flower agrees with them.
    assert [records[i]["status"] for i in succeeding] == ["SUCCEEDED"] * 3
    assert [records[i]["status"] for i in failing] == ["FAILED"] * 2
    assert records[retried]["status"] == "SUCCEEDED"
    assert records[retried]["attempt"] == 2

    # One Celery task per attempt, named after its type, with the taskdock id in its kwargs.
    assert set(tasks) == {f"{i}.1" for i in ids} | {f"{retried}.2"}
    for celery_id, task in tasks.items():
        task_id, attempt = celery_id.rsplit(".", 1)
        assert task["kwargs"] == repr({"task_id": task_id, "attempt": int(attempt)})
        assert task["args"] == "()"
    assert set(found) == {f"{retried}.1", f"{retried}.2"}  # the taskdock id finds every attempt
    assert "taskdock.execute" not in types
    assert {"process_data", "tests.no_retry", "tests.flaky"} <= set(types)

    # A failure carries the error the record holds, with the task's own traceback.
    assert records[failing[0]]["error"]["type"] == "NoRetryError"
    assert failed["name"] == "tests.no_retry"
    assert failed["state"] == "FAILURE"
    assert "NoRetryError: not retryable" in failed["exception"]
    assert 'raise NoRetryError("not retryable")' in failed["traceback"]
    assert "FlakyError: failing attempt 1" in tasks[f"{retried}.1"]["exception"]
    assert tasks[f"{succeeding[0]}.1"]["result"] == repr("succeeded")

    # One line per outcome from the runner; Celery logs no traceback for them.
    assert "Traceback" not in worker_log
    assert worker_log.count('"message": "task failed"') == 3
