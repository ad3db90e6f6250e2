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
    ScheduleChanges,
    Unauthorized,
)
from app.schedules.schemas import ScheduleUpdate
from tests.support import services
from tests.support.stack import LiveSystem, live_system, taskdock
from tests.webhooks.receiver import receiving

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

QUICK = {"user_id": 1, "data": "x"}


def client_of(live: LiveSystem, **options: Any) -> Client:
    """A client of a new owner: the tasks it sees are its own."""
    return Client(live.base, api_key=live.new_key(), **options)


class DropFirstAnswer(httpx.BaseTransport):
    """The real transport; the first `method` request reaches the server, its answer is lost."""

    def __init__(self, method: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.method = method
        self.dropped = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method == self.method and self.dropped == 0:
            response.read()
            self.dropped += 1
            raise httpx.ReadError("connection reset", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSystem]:
    with live_system(
        tmp_path_factory.mktemp("client"),
        TASKDOCK_API_KEY_CACHE_SECONDS="0",
        TASKDOCK_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",  # the deliveries test's receiver
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
    transport = DropFirstAnswer("POST")
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


def test_runs_show_each_attempt_of_a_task_that_failed_and_was_retried(live: LiveSystem) -> None:
    with client_of(live) as client:
        task = client.submit("tests.flaky", {"fail_times": 1})
        assert client.wait(task.id, timeout=30).status == "SUCCEEDED"

        runs = client.runs(task.id)

        assert [(run.attempt, run.outcome) for run in runs] == [(1, "FAILED"), (2, "SUCCEEDED")]
        assert runs[0].error is not None
        assert runs[0].error.type == "FlakyError"
        assert runs[0].error.message == "failing attempt 1"
        assert runs[1].error is None
        assert all(run.worker and run.duration is not None for run in runs), runs
        with pytest.raises(NotFound):
            client.runs(uuid.uuid4())


def test_deliveries_tell_how_a_tasks_webhook_went(live: LiveSystem) -> None:
    with client_of(live) as client, receiving([200]) as receiver:
        task = client.submit("process_data", QUICK, notify_url=receiver.url)
        plain = client.submit("process_data", QUICK)
        assert client.wait(task.id, timeout=30).status == "SUCCEEDED"
        got = receiver.wait_for(1, timeout=30)
        services.wait_for(
            lambda: [item.status for item in client.deliveries(task.id)] == ["delivered"],
            timeout=30,
            what="the delivery to be recorded",
        )

        [delivery] = client.deliveries(task.id)

        assert delivery.url == receiver.url
        assert (delivery.attempt, delivery.attempts, delivery.last_status_code) == (1, 1, 200)
        assert got[0].headers["webhook-id"] == delivery.webhook_id
        assert client.deliveries(plain.id) == []
        with pytest.raises(NotFound):
            client.deliveries(uuid.uuid4())


def test_bulk_retry_takes_what_its_dry_run_counted(live: LiveSystem) -> None:
    with client_of(live) as client:
        failed = [client.submit("tests.no_retry", {}) for _ in range(3)]
        for task in failed:
            assert client.wait(task.id, timeout=30).status == "FAILED"
        client.submit("process_data", QUICK, countdown=600)  # QUEUED: no retry takes it

        counted = client.bulk_retry(status="FAILED", limit=10, dry_run=True)

        assert (counted.matched, counted.changed, counted.dry_run) == (3, 0, True)
        assert sorted(map(str, counted.ids or [])) == sorted(str(task.id) for task in failed)
        assert {client.get(task.id).attempt for task in failed} == {1}

        done = client.bulk_retry(type="tests.no_retry", created_after=failed[0].created_at, limit=2)

        assert (done.matched, done.changed, done.dry_run) == (2, 2, False)
        assert done.ids == [failed[0].id, failed[1].id]  # oldest first, at most `limit`
        assert [client.get(task.id).attempt for task in failed] == [2, 2, 1]
        with pytest.raises(InvalidRequest) as everything:
            client.bulk_retry(limit=10)  # no criterion would take every task
        assert everything.value.status_code == 422

        waiting = [client.submit("process_data", QUICK, countdown=600) for _ in range(2)]
        cancelled = client.bulk_cancel(ids=[task.id for task in waiting], limit=10)

        assert cancelled.changed == 2
        assert {client.get(task.id).status for task in waiting} == {"CANCELLED"}


def test_a_schedules_life_through_the_client(live: LiveSystem) -> None:
    with client_of(live) as client:
        created = client.create_schedule(
            "process_data",
            QUICK,
            cron="0 3 * * *",
            timezone="Europe/Berlin",
            name="nightly",
            priority=3,
        )
        assert (created.cron, created.timezone, created.paused) == (
            "0 3 * * *",
            "Europe/Berlin",
            False,
        )
        assert [item.id for item in client.schedules()] == [created.id]

        assert client.pause_schedule(created.id).paused is True
        assert client.schedule(created.id).paused is True
        assert client.resume_schedule(created.id).paused is False
        changed = client.update_schedule(created.id, cron=None, interval_seconds=600, name="often")

        assert (changed.cron, changed.interval_seconds, changed.name) == (None, 600, "often")
        assert (changed.payload, changed.priority) == (QUICK, 3)  # only the fields given changed
        with pytest.raises(Conflict) as taken:
            client.create_schedule("process_data", QUICK, interval_seconds=60, name="often")
        assert taken.value.code == "schedule_name_taken"
        with pytest.raises(InvalidRequest) as bad_cron:
            client.create_schedule("process_data", QUICK, cron="61 * * * *")
        assert ["body", "cron"] in [field["loc"] for field in bad_cron.value.fields]

        client.delete_schedule(created.id)

        with pytest.raises(NotFound):
            client.schedule(created.id)
        with pytest.raises(NotFound) as gone:
            client.delete_schedule(created.id)
        assert gone.value.repeated is False
        assert client.schedules() == []


def test_a_schedule_creation_whose_answer_was_lost_is_not_repeated(live: LiveSystem) -> None:
    key = live.new_key()
    lost = DropFirstAnswer("POST")
    with (
        Client(live.base, api_key=key, transport=lost, backoff=0.05) as client,
        pytest.raises(httpx.ReadError),
    ):
        client.create_schedule("process_data", QUICK, interval_seconds=3600)
    with Client(live.base, api_key=key) as client:
        [made] = client.schedules()  # one schedule: the lost answer's, never a second

        lost_delete = DropFirstAnswer("DELETE")
        with Client(live.base, api_key=key, transport=lost_delete, backoff=0.05) as deleting:
            deleting.delete_schedule(made.id)  # repeated; its 404 means the first one did it

        assert lost_delete.dropped == 1
        assert client.schedules() == []


def test_the_async_client_reads_runs_and_keeps_schedules(live: LiveSystem) -> None:
    key = live.new_key()

    async def scenario() -> None:
        async with AsyncClient(live.base, api_key=key) as client:
            task = await client.submit("tests.flaky", {"fail_times": 1})
            assert (await client.wait(task.id, timeout=30)).status == "SUCCEEDED"
            runs = await client.runs(task.id)
            assert [run.outcome for run in runs] == ["FAILED", "SUCCEEDED"]
            counted = await client.bulk_retry(ids=[task.id], limit=1, dry_run=True)
            assert counted.matched == 0  # SUCCEEDED: not a task retry takes

            made = await client.create_schedule("process_data", QUICK, interval_seconds=60)
            assert (await client.pause_schedule(made.id)).paused is True
            changed = await client.update_schedule(made.id, priority=9)
            assert (changed.priority, changed.paused) == (9, True)
            assert [item.id for item in await client.schedules()] == [made.id]
            await client.delete_schedule(made.id)
            with pytest.raises(NotFound):
                await client.schedule(made.id)
            with pytest.raises(InvalidRequest) as bad_cron:
                await client.create_schedule("process_data", QUICK, cron="every day")
            assert ["body", "cron"] in [field["loc"] for field in bad_cron.value.fields]

    anyio.run(scenario)


def test_schedule_changes_name_every_field_the_api_takes() -> None:
    # update_schedule sends what it is given: a field missing here could not be changed.
    assert set(ScheduleChanges.__annotations__) == set(ScheduleUpdate.model_fields)


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
