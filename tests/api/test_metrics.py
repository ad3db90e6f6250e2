"""/metrics: parsed with prometheus-client's own parser, in one process and across several."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support.services import free_port, wait_for
from tests.support.stack import Stack, base_env, running_stack, taskdock, wait_status


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_http_and_backlog_metrics(embedded_client: TestClient) -> None:
    # This process's counters are shared by every test in it: compare before and after.
    before = scrape(embedded_client.get("/metrics").text)
    task = embedded_client.post(
        "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
    ).json()
    embedded_client.get(f"/api/v1/tasks/{task['id']}")
    embedded_client.get(f"/api/v1/tasks/{uuid.uuid4()}")
    embedded_client.post(
        "/api/v1/tasks",
        json={"type": "process_data", "payload": {"user_id": 1, "data": "y"}, "countdown": 600},
    )

    response = embedded_client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = scrape(response.text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/api/v1/tasks/{task_id}"
    assert grew("taskdock_http_requests_total", method="GET", route=route, status="200") == 1
    assert grew("taskdock_http_requests_total", method="GET", route=route, status="404") == 1
    assert grew("taskdock_tasks_submitted_total", type="process_data") == 2
    assert grew("taskdock_db_query_duration_seconds_count", statement="insert") >= 2
    assert all(task["id"] not in str(labels) for _, labels in after)  # templates, never raw paths
    assert value(after, "taskdock_tasks", status="QUEUED") == 2
    # One message on the broker; the delayed task waits in the database, not in the queue.
    assert value(after, "taskdock_queue_depth", queue="default") == 1
    assert ("taskdock_outbox_tasks", ()) in after


@pytest.mark.slow
def test_totals_are_right_with_several_api_processes(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    assert taskdock("migrate", env=env).returncode == 0
    with running_stack(env, tmp_path / "logs") as stack:
        _, base = stack.api(workers=2)
        with httpx.Client(base_url=base) as client:
            for _ in range(40):
                # New connections, so both server processes answer some of them.
                assert httpx.get(f"{base}/api/v1/task-types").status_code == 200
            readings = [scrape(client.get("/metrics").text) for _ in range(6)]

    for samples in readings:
        total = value(
            samples,
            "taskdock_http_requests_total",
            method="GET",
            route="/api/v1/task-types",
            status="200",
        )
        assert total == 40  # whichever process answered the scrape
        assert value(samples, "taskdock_processes", role="api") == 2


@pytest.mark.slow
def test_each_worker_serves_its_own_metrics(
    tmp_path: Path, embedded_client: TestClient, embedded_env: dict[str, str]
) -> None:
    port = free_port()
    env = {**embedded_env, "TASKDOCK_WORKER_METRICS_PORT": str(port)}
    with running_stack(env, tmp_path / "logs") as stack:
        worker = Stack.worker(stack, concurrency=2)
        task = embedded_client.post(
            "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
        ).json()
        wait_status(embedded_client, task["id"], {"SUCCEEDED"})

        samples = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        assert value(samples, "taskdock_tasks_succeeded_total", type="process_data") == 1
        assert value(samples, "taskdock_tasks_started_total", type="process_data") == 1
        assert value(samples, "taskdock_task_run_seconds_count", type="process_data") == 1
        assert value(samples, "taskdock_processes", role="worker") == 2

        worker.stop()

        def down() -> bool:
            try:
                httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            except httpx.HTTPError:
                return True
            return False

        wait_for(down, timeout=10, what="the stopped worker's metrics to go away")


@pytest.mark.slow
def test_broker_gauges_apart_from_the_database(tmp_path: Path, configure: object) -> None:
    from app.main import create_app
    from tests.conftest import migrate_now
    from tests.support.services import RedisServer

    redis_server = RedisServer(tmp_path / "redis")
    configure(base_env(tmp_path / "data", TASKDOCK_BROKER_URL=redis_server.url))  # type: ignore[operator]
    migrate_now()
    with TestClient(create_app()) as client:
        down = scrape(client.get("/metrics").text)
        redis_server.start()
        try:
            up = scrape(client.get("/metrics").text)
        finally:
            redis_server.stop()

    # A dead broker: reported as down, and the database's gauges are still there.
    assert value(down, "taskdock_broker_up") == 0
    assert ("taskdock_outbox_tasks", ()) in down
    assert value(down, "taskdock_tasks", status="QUEUED") == 0
    assert ("taskdock_queue_depth", (("queue", "default"),)) not in down
    # An idle Redis has no list for the queue at all: that is a depth of 0, not a gap.
    assert value(up, "taskdock_broker_up") == 1
    assert ("taskdock_queue_depth", (("queue", "default"),)) in up
    assert value(up, "taskdock_queue_depth", queue="default") == 0
