"""The promises under faults: a dead broker, a killed worker, a poison task, a dead database.

Each test owns its broker (a redis-server on a free port) or a closed port; the machine's
shared servers are never stopped.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from app.core.db import session_scope
from app.tasks.models import Task
from tests.conftest import migrate_now
from tests.support import services
from tests.support.services import RedisServer, free_port
from tests.support.stack import Stack, base_env, running_stack, wait_status, wait_until_answering

pytestmark = pytest.mark.slow


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with services.scratch_database() as url:
        yield url


@pytest.fixture
def redis_system(
    tmp_path: Path, configure: object, own_redis: RedisServer, pg_url: str
) -> Iterator[tuple[dict[str, str], Stack]]:
    """PostgreSQL + a private Redis (not started yet) + a stack for workers and dispatchers."""
    env = base_env(
        tmp_path / "data", TASKDOCK_DATABASE_URL=pg_url, TASKDOCK_BROKER_URL=own_redis.url
    )
    configure(env)  # type: ignore[operator]
    migrate_now()
    with running_stack(env, tmp_path / "logs") as stack:
        yield env, stack


def make_client() -> TestClient:
    from app.main import create_app

    return TestClient(create_app(), raise_server_exceptions=False)


def test_broker_down_at_submit_loses_nothing(
    redis_system: tuple[dict[str, str], Stack], own_redis: RedisServer
) -> None:
    _, stack = redis_system
    with make_client() as client:
        ids, slowest = [], 0.0
        for index in range(50):
            started = time.monotonic()
            response = client.post(
                "/api/v1/tasks",
                json={"type": "process_data", "payload": {"user_id": index, "data": "x"}},
            )
            slowest = max(slowest, time.monotonic() - started)
            assert response.status_code == 202, response.text
            assert response.json()["queued_at"] is None
            ids.append(response.json()["id"])
        assert slowest < 2.0  # a bounded publish, never Celery's own retry loop
        with session_scope() as session:
            unpublished = session.scalar(
                select(func.count()).select_from(Task).where(Task.published_at.is_(None))
            )
        assert unpublished == 50  # recorded, waiting in the outbox for the broker

        own_redis.start()
        stack.worker()
        stack.dispatcher()

        statuses = [
            wait_status(client, task_id, {"SUCCEEDED", "FAILED"})["status"] for task_id in ids
        ]
    assert statuses == ["SUCCEEDED"] * 50, stack.dump_logs()


def kill_worker_mid_task(stack: Stack, client: TestClient) -> dict[str, object]:
    first = stack.worker("w1")
    stack.dispatcher()
    response = client.post("/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 4}})
    assert response.status_code == 202
    task_id = response.json()["id"]
    running = wait_status(client, task_id, {"RUNNING"})
    assert running["worker"].startswith("w1@")

    first.kill()  # SIGKILL to the worker and its pool: no warm shutdown, no ack
    stack.worker("w2")

    done = wait_status(client, task_id, {"SUCCEEDED", "FAILED"}, timeout=60)
    assert done["status"] == "SUCCEEDED", stack.dump_logs()
    assert done["worker"].startswith("w2@")
    return done


def test_killed_worker_task_succeeds_on_another_worker(
    redis_system: tuple[dict[str, str], Stack], own_redis: RedisServer
) -> None:
    _, stack = redis_system
    own_redis.start()
    with make_client() as client:
        done = kill_worker_mid_task(stack, client)
    assert done["attempt"] == 1
    assert done["deliveries"] == 2  # the lost run and the one that finished


def test_killed_worker_task_succeeds_on_the_embedded_broker(
    tmp_path: Path, configure: object
) -> None:
    env = base_env(tmp_path / "data")
    configure(env)  # type: ignore[operator]
    migrate_now()
    with running_stack(env, tmp_path / "logs") as stack, make_client() as client:
        done = kill_worker_mid_task(stack, client)
    assert done["deliveries"] == 2


def test_poison_task_ends_failed_never_running(
    redis_system: tuple[dict[str, str], Stack], own_redis: RedisServer
) -> None:
    _, stack = redis_system
    own_redis.start()
    stack.worker()
    stack.dispatcher()
    with make_client() as client:
        response = client.post("/api/v1/tasks", json={"type": "tests.crash", "payload": {}})
        done = wait_status(client, response.json()["id"], {"SUCCEEDED", "FAILED"}, timeout=90)
    assert done["status"] == "FAILED"
    assert done["error"]["type"] == "WorkerLost"
    assert "times running this attempt" in done["error"]["message"]
    # Three hand-outs died; under load a fourth may be claimed and ended at once.
    assert done["deliveries"] in (3, 4)


def test_database_down_answers_503_fast_and_publishes_nothing(
    tmp_path: Path, configure: object, own_redis: RedisServer
) -> None:
    own_redis.start()
    dead = f"postgresql+psycopg://taskdock@127.0.0.1:{free_port()}/taskdock"
    configure(  # type: ignore[operator]
        base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=dead, TASKDOCK_BROKER_URL=own_redis.url)
    )
    with make_client() as client:
        started = time.monotonic()
        response = client.post(
            "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
        )
        elapsed = time.monotonic() - started

    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert elapsed < 2.0
    broker = redis.Redis(port=own_redis.port)
    # No message anywhere (the rate limiter's own counter may live here too).
    assert [key for key in broker.keys("*") if not key.startswith((b"_kombu", b"taskdock:"))] == []


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port that completes TCP handshakes and then never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def ready(client: TestClient) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    response = client.get("/health/ready")
    return response.status_code, response.json(), time.monotonic() - started


def test_health_reports_each_dependency_within_a_second(
    redis_system: tuple[dict[str, str], Stack], own_redis: RedisServer
) -> None:
    own_redis.start()
    with make_client() as client:
        code, body, _ = ready(client)
        assert (code, body) == (200, {"status": "ok", "db": True, "redis": True})
        assert client.get("/health").json() == body

        own_redis.stop()
        code, body, elapsed = ready(client)
    assert code == 503
    assert body == {"status": "unavailable", "db": True, "redis": False}
    assert elapsed < 1.5


@pytest.mark.parametrize("kind", ["closed", "blackhole"])
def test_health_never_hangs_on_a_dead_database(
    tmp_path: Path, configure: object, blackhole: int, kind: str
) -> None:
    port = blackhole if kind == "blackhole" else free_port()
    configure(  # type: ignore[operator]
        base_env(
            tmp_path / "data",
            TASKDOCK_DATABASE_URL=f"postgresql+psycopg://taskdock@127.0.0.1:{port}/taskdock",
        )
    )
    with make_client() as client:
        code, body, elapsed = ready(client)
        live = client.get("/health/live")
    assert code == 503
    assert body["db"] is False
    assert elapsed < 1.5
    assert live.status_code == 200


def test_silent_broker_never_hangs_a_submission(
    tmp_path: Path, configure: object, blackhole: int
) -> None:
    configure(  # type: ignore[operator]
        base_env(tmp_path / "data", TASKDOCK_BROKER_URL=f"redis://127.0.0.1:{blackhole}/0")
    )
    migrate_now()
    with make_client() as client:
        started = time.monotonic()
        response = client.post(
            "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
        )
        elapsed = time.monotonic() - started

    assert response.status_code == 202
    assert elapsed < 2.0  # TASKDOCK_PUBLISH_TIMEOUT (1 s) bounds it, not the socket's timeout
    with session_scope() as session:
        task = session.get(Task, uuid.UUID(response.json()["id"]))
        assert task is not None
        assert task.published_at is None  # left for the dispatcher


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_worker_survives_a_broker_restart_and_finishes_every_task(
    tmp_path: Path, configure: object, pg_url: str, broker: str
) -> None:
    """The broker killed under load and started again: the worker carries on by itself, and
    every accepted task finishes within a minute of the broker's return.

    On Redis, kombu's reconnect died of `'NoneType' object has no attribute 'hostname'`
    (celery/kombu#582, celery/celery#9250): the worker exited for good. A restarted Redis is
    empty, so the dispatcher must also find the messages it lost.
    """
    server: RedisServer | services.RabbitMQServer = (
        RedisServer(tmp_path / "redis")
        if broker == "redis"
        else services.RabbitMQServer(tmp_path / "rabbitmq")
    )
    env = base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=pg_url, TASKDOCK_BROKER_URL=server.url)
    configure(env)  # type: ignore[operator]
    migrate_now()
    server.start()
    try:
        with running_stack(env, tmp_path / "logs") as stack:
            # As an operator starts it: no flags (the suite's other workers run without gossip).
            worker = stack.worker(concurrency=2, options=())
            stack.dispatcher()
            ids: list[str] = []

            def submit_all() -> None:
                with make_client() as client:
                    for n in range(1500):
                        response = client.post(
                            "/api/v1/tasks",
                            json={"type": "sleep", "payload": {"seconds": 0.01 if n % 2 else 0}},
                        )
                        assert response.status_code == 202, response.text
                        ids.append(response.json()["id"])

            submitter = threading.Thread(target=submit_all)
            submitter.start()
            time.sleep(4.0)  # tasks flow in, and the worker is busy
            if isinstance(server, RedisServer):
                assert server.process is not None
                server.process.kill()  # SIGKILL: the broker's messages are gone
                server.process.wait(timeout=10)
            else:
                server.kill()
            time.sleep(0.2)
            server.start()
            back = time.monotonic()
            submitter.join(timeout=180)
            assert ids

            pending = set(ids)
            while pending and time.monotonic() < back + 60:
                with session_scope() as session:
                    finished = session.scalars(
                        select(Task.id).where(Task.status.in_(["SUCCEEDED", "FAILED"]))
                    )
                    pending -= {str(task_id) for task_id in finished}
                time.sleep(0.5)
            assert worker.alive(), worker.output()[-4000:]
            assert not pending, f"{len(pending)} of {len(ids)} unfinished:\n{stack.dump_logs()}"
    finally:
        server.stop()


def test_after_a_database_crash_every_task_finishes_within_30_seconds(
    tmp_path: Path, configure: object, own_redis: RedisServer
) -> None:
    """PostgreSQL crashes (no checkpoint, asynchronous commits lost) while a backlog runs.

    Before, a run whose claim and outcome were both lost, its message already acknowledged,
    waited QUEUED for the stale-publication sweep: five minutes. A WAL writer that waits ten
    seconds, not 0.2, makes sure the crash takes every asynchronous commit of those seconds.
    """
    slow_wal_writer = {"wal_writer_delay": "10s", "wal_writer_flush_after": "1GB"}
    with services.private_postgres(settings=slow_wal_writer) as postgres:
        url = postgres.create_database("taskdock")
        # The default lease: a task stranded RUNNING would wait for it, and fail the bound.
        env = base_env(
            tmp_path / "data",
            TASKDOCK_DATABASE_URL=url,
            TASKDOCK_BROKER_URL=own_redis.url,
            TASKDOCK_TASK_LEASE_SECONDS="30",
        )
        configure(env)  # type: ignore[operator]
        migrate_now()
        own_redis.start()
        with running_stack(env, tmp_path / "logs") as stack:
            stack.worker(concurrency=2)
            stack.dispatcher()
            with make_client() as client:
                ids = [
                    client.post(
                        "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 0.03}}
                    ).json()["id"]
                    for _ in range(400)
                ]
            time.sleep(1.0)  # the worker is busy with the backlog
            postgres.crash()
            time.sleep(1.0)
            postgres.start()
            back = time.monotonic()
            pending = set(ids)
            while pending and time.monotonic() < back + 30:
                try:
                    with session_scope() as session:
                        done = session.scalars(
                            select(Task.id).where(Task.status.in_(["SUCCEEDED", "FAILED"]))
                        )
                        pending -= {str(task_id) for task_id in done}
                except OperationalError:
                    pass  # this process's pool reconnects too
                time.sleep(0.5)
            assert not pending, (
                f"{len(pending)} of {len(ids)} unfinished 30 s after the database came back:\n"
                f"{stack.dump_logs()}"
            )


# The API of the test below: uvicorn serving taskdock, except that the moment a batch of
# messages is about to leave for the broker the whole process is SIGKILLed. Its rows are
# committed, and marked published, by then.
DIES_BEFORE_PUBLISHING = """
import os, signal, sys
import uvicorn
from app.tasks import publication

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

publication.send_batch = die
uvicorn.run("app.main:app", host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def test_an_api_killed_between_its_commit_and_its_publish_loses_nothing(
    redis_system: tuple[dict[str, str], Stack], own_redis: RedisServer, tmp_path: Path
) -> None:
    env, stack = redis_system
    own_redis.start()
    port = free_port()
    doomed = stack.spawn(
        "doomed-api",
        [sys.executable, "-c", DIES_BEFORE_PUBLISHING, str(port)],
        env={**env, "TASKDOCK_REPUBLISH_AFTER_SECONDS": "10"},
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_answering(doomed, f"{base}/health/live")
    body = {"type": "process_data", "payload": {"user_id": 7, "data": "x"}}
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{base}/api/v1/tasks", json=body, timeout=10)  # no answer: it died
    doomed.process.wait(timeout=10)  # type: ignore[union-attr]

    with session_scope() as session:
        rows = session.execute(select(Task.id, Task.status, Task.published_at)).all()
    # Committed, and recorded as published, though the broker never heard of it.
    assert len(rows) == 1
    task_id, status, published_at = rows[0]
    assert (status, published_at is not None) == ("QUEUED", True)
    assert redis.Redis.from_url(own_redis.url).dbsize() == 0

    # The lost-message sweep finds the broker short of one message and the outbox sends it.
    stack.taskdock(
        "dispatcher", "dispatcher", env={**env, "TASKDOCK_REPUBLISH_AFTER_SECONDS": "10"}
    )
    stack.worker()
    with make_client() as client:
        done = wait_status(client, str(task_id), {"SUCCEEDED", "FAILED"}, timeout=60)
    assert done["status"] == "SUCCEEDED", stack.dump_logs()
