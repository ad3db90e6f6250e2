"""The Python client against a live API: PostgreSQL, Redis, a worker, a dispatcher, auth on."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from app.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    Unauthorized,
)
from tests.support import services
from tests.support.stack import LiveSystem, live_system, taskdock

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

QUICK = {"user_id": 1, "data": "x"}


def client_of(live: LiveSystem, **options: Any) -> Client:
    """A client of a new owner: the tasks it sees are its own."""
    return Client(live.base, api_key=live.new_key(), **options)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSystem]:
    with live_system(
        tmp_path_factory.mktemp("client"), TASKDOCK_API_KEY_CACHE_SECONDS="0"
    ) as system:
        yield system


def test_submit_and_wait_until_the_task_is_final(live: LiveSystem) -> None:
    with client_of(live) as client:
        task = client.submit("process_data", QUICK)
        assert task.status == "QUEUED"

        done = client.wait(task.id, timeout=30)

        assert done.status == "SUCCEEDED", done
        assert done.result is not None
        assert done.id == task.id
        assert client.get(task.id).status == "SUCCEEDED"


def test_wait_returns_the_current_record_when_its_time_is_up(live: LiveSystem) -> None:
    with client_of(live) as client:
        task = client.submit("process_data", QUICK, countdown=600)
        assert client.wait(task.id, timeout=1.5).status == "QUEUED"


def test_errors_carry_the_apis_error_body(live: LiveSystem) -> None:
    with client_of(live) as client:
        with pytest.raises(NotFound) as missing:
            client.get(uuid.uuid4())
        assert missing.value.code == "task_not_found"

        with pytest.raises(InvalidRequest) as invalid:
            client.submit("process_data", {"user_id": "not a number", "data": "x"})
        assert invalid.value.status_code == 422
        assert any("user_id" in field["loc"] for field in invalid.value.fields), invalid.value.body

        client.submit("process_data", QUICK, idempotency_key="same")
        with pytest.raises(Conflict) as reused:
            client.submit("process_data", {**QUICK, "data": "other"}, idempotency_key="same")
        assert reused.value.code == "idempotency_conflict"

    with Client(live.base, api_key="tdk_nope") as stranger, pytest.raises(Unauthorized):
        stranger.get(uuid.uuid4())


def test_a_submission_whose_answer_was_lost_is_retried_into_the_same_task(live: LiveSystem) -> None:
    class DropFirstAnswer(httpx.BaseTransport):
        """The real transport; the first submission reaches the server, its answer never returns."""

        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()
            self.dropped = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            response = self.inner.handle_request(request)
            if request.method == "POST" and self.dropped == 0:
                response.read()
                self.dropped += 1
                raise httpx.ReadError("connection reset", request=request)
            return response

    transport = DropFirstAnswer()
    with client_of(live, transport=transport, backoff=0.05) as client:
        task = client.submit("process_data", QUICK)
        listed = list(client.list())

    assert transport.dropped == 1
    assert [item.id for item in listed] == [task.id]


def test_list_iterates_over_every_page(live: LiveSystem) -> None:
    with client_of(live) as client:
        submitted = {client.submit("process_data", QUICK, countdown=600).id for _ in range(7)}

        listed = [task.id for task in client.list(status="QUEUED", page_size=3)]

        assert sorted(listed) == sorted(submitted)
        assert len(listed) == 7
        assert list(client.list(type="sleep")) == []


def test_cancel_and_retry(live: LiveSystem) -> None:
    with client_of(live) as client:
        task = client.submit("process_data", QUICK, countdown=600)

        assert client.cancel(task.id).status == "CANCELLED"
        again = client.retry(task.id)

        assert again.status == "QUEUED"
        assert again.attempt == 2
        assert client.wait(task.id, timeout=30).status == "SUCCEEDED"
        with pytest.raises(Conflict) as finished:
            client.cancel(task.id)
        assert finished.value.code == "task_finished"
        assert "process_data" in {kind.name for kind in client.task_types()}


def test_429_is_retried_after_the_servers_retry_after(live: LiveSystem, tmp_path: Path) -> None:
    env = {**live.env, "TASKDOCK_RATE_LIMIT_SUBMIT": "2/second"}
    port = services.free_port()
    api = live.stack.taskdock("api-limited", "api", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"
    services.wait_for(lambda: api.alive() and _up(base), timeout=60, what="the rate-limited API")
    key = live.new_key()

    def burst(client: Client) -> None:
        for _ in range(10):
            client.submit("process_data", QUICK, countdown=600)

    with Client(base, api_key=key, retries=0) as impatient:
        with pytest.raises(RateLimited) as limited:
            burst(impatient)
        assert limited.value.code == "rate_limited"

    with Client(base, api_key=key, retries=5) as patient:
        tasks = [patient.submit("process_data", QUICK, countdown=600) for _ in range(6)]
    assert len({task.id for task in tasks}) == 6


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/live", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_async_client(live: LiveSystem) -> None:
    key = live.new_key()

    async def scenario() -> None:
        async with AsyncClient(live.base, api_key=key) as client:
            task = await client.submit("process_data", QUICK)
            done = await client.wait(task.id, timeout=30)
            assert done.status == "SUCCEEDED"
            waiting = await client.submit("process_data", QUICK, countdown=600)
            assert (await client.cancel(waiting.id)).status == "CANCELLED"
            listed = [item.id async for item in client.list(page_size=1)]
            assert sorted(listed) == sorted([task.id, waiting.id])
            with pytest.raises(NotFound):
                await client.get(uuid.uuid4())

    anyio.run(scenario)


def test_the_tasks_commands_speak_to_a_remote_api(live: LiveSystem) -> None:
    env = {**live.env, "TASKDOCK_URL": live.base, "TASKDOCK_API_KEY": live.new_key()}

    submitted = taskdock(
        "tasks",
        "submit",
        "process_data",
        "--payload",
        '{"user_id": 3, "data": "cli"}',
        "--wait",
        "--json",
        env=env,
    )

    assert submitted.returncode == 0, submitted.stderr
    task = json.loads(submitted.stdout)
    assert task["status"] == "SUCCEEDED"
    assert f"{task['id']}: SUCCEEDED" in submitted.stderr  # the progress, on stderr

    shown = taskdock("tasks", "show", task["id"], env=env)
    assert shown.returncode == 0
    assert shown.stdout.startswith(f"{task['id']}  process_data  SUCCEEDED")

    bad = taskdock(
        "tasks", "submit", "process_data", "--payload", '{"user_id": "x", "data": 1}', env=env
    )
    assert bad.returncode == 1
    assert "payload.user_id" in bad.stderr, bad.stderr

    later = json.loads(
        taskdock(
            "tasks",
            "submit",
            "process_data",
            "--payload",
            '{"user_id": 3, "data": "z"}',
            "--countdown",
            "600",
            "--json",
            env=env,
        ).stdout
    )
    cancelled = taskdock("tasks", "cancel", later["id"], "--json", env=env)
    assert json.loads(cancelled.stdout)["status"] == "CANCELLED"
    listed = taskdock("tasks", "list", "--json", env=env)
    assert [item["id"] for item in json.loads(listed.stdout)] == [later["id"], task["id"]]

    missing = taskdock("tasks", "show", str(uuid.uuid4()), env=env)
    assert missing.returncode == 1
    assert "task_not_found" in missing.stderr
    away = taskdock("tasks", "list", env={**env, "TASKDOCK_URL": "http://127.0.0.1:9"})
    assert away.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in away.stderr
