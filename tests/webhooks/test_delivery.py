"""Webhooks delivered by the real dispatcher process to real HTTP receivers: retried with
backoff until a receiver answers, signed so the standardwebhooks library verifies them, failed
once the window is over, and sent even when the API is gone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from tests.support.stack import Stack, taskdock, wait_status
from tests.webhooks.receiver import Received, receiving

PROCESS = {"type": "process_data", "payload": {"user_id": 7, "data": "hello"}}
LOOPBACK = {"TASKDOCK_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}


@pytest.fixture(params=["embedded", "postgres-redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Any, configure: object) -> Iterator[Any]:
    """The embedded default and PostgreSQL + Redis (conftest's fixture, narrowed)."""
    from tests.conftest import backend_env, migrate_now
    from tests.support import services

    if request.param == "embedded":
        env = backend_env("embedded", tmp_path / "data", None)
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env
        return
    with services.scratch_database() as url:
        env = backend_env(request.param, tmp_path / "data", url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env


def create_key(stack: Stack, name: str) -> tuple[str, str]:
    """(API key, its webhook secret) from `taskdock keys create`."""
    created = taskdock("keys", "create", "--name", name, env=stack.env)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.strip().splitlines()
    assert lines[-1].startswith("tdk_")
    assert lines[-2].startswith("whsec_")
    return lines[-1], lines[-2]


def deliveries(client: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/tasks/{task_id}/deliveries")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def wait_delivery(
    client: httpx.Client, task_id: str, status: str, *, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = deliveries(client, task_id)
        if found and found[0]["status"] == status:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"delivery of {task_id} not {status}: {found}")


def verified(secret: str, received: Received) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


def test_a_receiver_that_fails_three_times_gets_the_fourth_signed(stack: Stack) -> None:
    stack.env.update(LOOPBACK, TASKDOCK_AUTH_ENABLED="true")
    key, secret = create_key(stack, "billing")
    other_key, other_secret = create_key(stack, "someone-else")
    assert other_secret != secret
    stack.worker()
    stack.dispatcher()
    _, base = stack.api()
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    with receiving([500, 502, 503, 200]) as receiver:
        response = client.post("/api/v1/tasks", json={**PROCESS, "notify_url": receiver.url})
        assert response.status_code == 202, response.text
        task_id = response.json()["id"]
        final = wait_status(client, task_id, {"SUCCEEDED"})

        got = receiver.wait_for(4, timeout=60)
        delivery = wait_delivery(client, task_id, "delivered")
        time.sleep(1.5)  # nothing more comes once one was taken
        assert len(receiver.received) == 4

    # The same message each time: one id, one body, each signed afresh.
    assert {r.headers["webhook-id"] for r in got} == {delivery["webhook_id"]}
    assert {r.body for r in got} == {got[0].body}
    assert all(r.path == "/hooks/taskdock" for r in got)
    payload = verified(secret, got[-1])
    assert payload["type"] == "task.succeeded"
    assert payload["data"] == final
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(other_secret).verify(got[-1].body, got[-1].headers)

    assert delivery["attempts"] == 4
    assert delivery["last_status_code"] == 200
    assert delivery["url"] == receiver.url
    assert delivery["attempt"] == 1
    assert delivery["delivered_at"] is not None
    # Exponential backoff: 0.5-1 s after the first try, 2-4 s after the third.
    assert got[3].at - got[2].at > got[1].at - got[0].at
    # Another key does not see the task's deliveries.
    other = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {other_key}"})
    assert other.get(f"/api/v1/tasks/{task_id}/deliveries").status_code == 404
    scraped = client.get("/metrics").text
    assert 'taskdock_webhook_deliveries{status="delivered"} 1.0' in scraped


def test_a_receiver_down_for_the_whole_window_is_marked_failed(stack: Stack) -> None:
    stack.env.update(LOOPBACK, TASKDOCK_WEBHOOK_RETRY_WINDOW_SECONDS="4")
    stack.worker()
    stack.dispatcher()
    _, base = stack.api()
    client = httpx.Client(base_url=base, timeout=10)
    # A long answer: only a few hundred bytes of it may be kept.
    with receiving([503], body=b"x" * 5000) as receiver:
        response = client.post("/api/v1/tasks", json={**PROCESS, "notify_url": receiver.url})
        task_id = response.json()["id"]
        wait_status(client, task_id, {"SUCCEEDED"})
        delivery = wait_delivery(client, task_id, "failed", timeout=30)
        tried = len(receiver.received)
        time.sleep(1.5)
        assert len(receiver.received) == tried  # failed is final

    assert delivery["attempts"] == tried >= 3
    assert delivery["last_status_code"] == 503
    assert delivery["last_error"].startswith("HTTP 503: xxx")
    assert len(delivery["last_error"].encode()) <= 300
    assert delivery["next_attempt_at"] is None
    assert delivery["delivered_at"] is None
    scraped = client.get("/metrics").text
    assert 'taskdock_webhook_deliveries{status="failed"} 1.0' in scraped
    assert 'taskdock_webhook_deliveries{status="pending"} 0.0' in scraped


def test_the_api_killed_after_the_task_finished_does_not_lose_the_webhook(
    stack: Stack,
) -> None:
    stack.env.update(LOOPBACK)
    shown = taskdock("keys", "webhook-secret", "--anonymous", env=stack.env)
    secret = shown.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    stack.worker()
    api, base = stack.api()
    client = httpx.Client(base_url=base, timeout=10)
    with receiving([200]) as receiver:
        response = client.post("/api/v1/tasks", json={**PROCESS, "notify_url": receiver.url})
        task_id = response.json()["id"]
        final = wait_status(client, task_id, {"SUCCEEDED"})
        api.kill()
        time.sleep(1)
        assert receiver.received == []  # no dispatcher yet: nobody has sent it

        stack.dispatcher()
        got = receiver.wait_for(1, timeout=30)

    payload = verified(secret, got[0])
    assert payload["type"] == "task.succeeded"
    assert payload["data"]["id"] == task_id
    assert payload["data"] == final


def test_the_address_is_checked_again_at_delivery(stack: Stack) -> None:
    # Loopback is not allowed: what the sender resolves at delivery decides, not the row.
    stack.env.update(TASKDOCK_WEBHOOK_RETRY_WINDOW_SECONDS="2")
    stack.worker()
    stack.dispatcher()
    _, base = stack.api()
    # The API refuses it at submit ...
    client = httpx.Client(base_url=base, timeout=10)
    with receiving([200]) as receiver:
        refused = client.post("/api/v1/tasks", json={**PROCESS, "notify_url": receiver.url})
        assert refused.status_code == 422
        assert refused.json()["fields"][0]["loc"] == ["body", "notify_url"]
        # ... and a row that names it anyway (written before the setting changed) is refused
        # by the sender, which never connects.
        task_id = submit_unchecked(stack, receiver.url)
        delivery = wait_delivery(client, task_id, "failed", timeout=30)
        assert receiver.received == []
    assert delivery["last_error"].startswith("refused: 127.0.0.1 is not a public address")
    assert delivery["last_status_code"] is None


def submit_unchecked(stack: Stack, url: str) -> str:
    """A task with a notify_url written straight into the record (as an older setting let)."""
    from app.core.db import session_scope
    from app.tasks import service
    from app.tasks.schemas import TaskCreate

    with session_scope() as session:
        task, _ = service.submit(
            session=session,
            data=TaskCreate.model_validate({**PROCESS, "notify_url": url}),
            owner="",
            idempotency_key=None,
            extra_queues=[],
        )
        return str(task.id)


@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
def test_two_dispatchers_send_each_end_of_a_task_once(stack: Stack) -> None:
    stack.env.update(LOOPBACK)
    stack.worker(concurrency=2)
    stack.dispatcher("d1")
    stack.dispatcher("d2")
    _, base = stack.api()
    client = httpx.Client(base_url=base, timeout=10)
    with receiving([200], delay=0.3) as receiver:
        ids = [
            client.post("/api/v1/tasks", json={**PROCESS, "notify_url": receiver.url}).json()["id"]
            for _ in range(10)
        ]
        # A task cancelled, then retried: each end owes its own delivery.
        held = {"type": "sleep", "payload": {"seconds": 0}, "countdown": 300}
        again = client.post("/api/v1/tasks", json={**held, "notify_url": receiver.url}).json()
        assert client.post(f"/api/v1/tasks/{again['id']}/cancel").status_code == 200
        wait_delivery(client, again["id"], "delivered")
        assert client.post(f"/api/v1/tasks/{again['id']}/retry").status_code == 202
        wait_status(client, again["id"], {"SUCCEEDED"})

        got = receiver.wait_for(12, timeout=60)
        for task_id in ids:
            wait_delivery(client, task_id, "delivered")
        time.sleep(2)
        got = list(receiver.received)

    assert len(got) == 12
    assert len({r.headers["webhook-id"] for r in got}) == 12
    events = [json.loads(r.body) for r in got]
    assert sorted(e["data"]["id"] for e in events if e["data"]["id"] in ids) == sorted(ids)
    ends = [(e["type"], e["data"]["attempt"]) for e in events if e["data"]["id"] == again["id"]]
    assert ends == [("task.cancelled", 1), ("task.succeeded", 2)]
    listed = deliveries(client, again["id"])
    assert [(d["attempt"], d["status"]) for d in listed] == [(1, "delivered"), (2, "delivered")]
