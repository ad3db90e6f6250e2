"""The `taskdock` command as users run it: dev mode, readiness waits, health checks, status."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.services import free_port, wait_for
from tests.support.stack import Proc, base_env, taskdock

pytestmark = pytest.mark.slow


def all_stopped(proc: Proc) -> bool:
    """The dev process exited (and is reaped) and no process of its group is left."""
    assert proc.process is not None
    if proc.process.poll() is None:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[Proc, str, Path]]:
    env = base_env(tmp_path / "unused")
    for key in ("TASKDOCK_DATA_DIR", "TASKDOCK_WORKER_HEARTBEAT_FILE"):
        env.pop(key)
    env["TASKDOCK_WORKER_HEARTBEAT_FILE"] = str(tmp_path / "dev-worker.heartbeat")
    port = free_port()
    proc = Proc(
        name="dev",
        args=[sys.executable, "-m", "app.cli", "dev", "--port", str(port)],
        env={**env, "PWD": str(tmp_path)},
        log=tmp_path / "dev.log",
    )
    # `taskdock dev` keeps its data under the working directory.
    proc.args = ["/bin/sh", "-c", f'cd "{tmp_path}" && exec "$@"', "sh", *proc.args]
    proc.start()
    base = f"http://127.0.0.1:{port}"
    heartbeat = tmp_path / "dev-worker.heartbeat"
    try:
        wait_for(lambda: heartbeat.exists() and _up(base), timeout=60, what="taskdock dev to start")
        yield proc, base, tmp_path
    finally:
        proc.kill()


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_dev_runs_a_task_to_succeeded_within_two_seconds(dev: tuple[Proc, str, Path]) -> None:
    proc, base, workdir = dev
    started = time.monotonic()
    response = httpx.post(
        f"{base}/api/v1/tasks",
        json={"type": "process_data", "payload": {"user_id": 1, "data": "hi"}},
    )
    assert response.status_code == 202
    status = ""
    while time.monotonic() - started < 2.0:
        status = httpx.get(f"{base}/api/v1/tasks/{response.json()['id']}").json()["status"]
        if status == "SUCCEEDED":
            break
        time.sleep(0.05)

    assert status == "SUCCEEDED", proc.output()[-3000:]
    assert (workdir / ".taskdock" / "taskdock.db").exists()

    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    wait_for(lambda: all_stopped(proc), timeout=40, what="every dev child to stop")


def test_dev_stops_its_children_on_sigterm(dev: tuple[Proc, str, Path]) -> None:
    proc, _, _ = dev
    assert proc.process is not None
    proc.process.send_signal(signal.SIGTERM)  # only the parent: it must stop the rest
    proc.process.wait(timeout=40)
    wait_for(lambda: all_stopped(proc), timeout=40, what="every dev child to stop")


def test_wait_succeeds_and_gives_up_with_one_line(tmp_path: Path) -> None:
    ok = taskdock("wait", "--timeout", "5", env=base_env(tmp_path / "data"))
    assert ok.returncode == 0, ok.stderr
    assert "ready" in ok.stdout

    dead = base_env(
        tmp_path / "data",
        TASKDOCK_DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
    )
    started = time.monotonic()
    failed = taskdock("wait", "--timeout", "2", env=dead)

    assert failed.returncode == 1
    assert time.monotonic() - started < 30
    assert failed.stderr.strip().startswith("gave up after 2s waiting for database")
    assert len(failed.stderr.strip().splitlines()) == 1


def test_heartbeat_health_commands(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data", TASKDOCK_WORKER_HEARTBEAT_MAX_AGE="5")
    heartbeat = Path(env["TASKDOCK_WORKER_HEARTBEAT_FILE"])

    missing = taskdock("worker-health", env=env)
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    heartbeat.touch()
    fresh = taskdock("worker-health", env=env)
    os.utime(heartbeat, (time.time() - 60, time.time() - 60))
    stale = taskdock("worker-health", env=env)
    no_dispatcher = taskdock("dispatcher-health", env=env)

    assert missing.returncode == 1
    assert "no heartbeat" in missing.stderr
    assert fresh.returncode == 0
    assert stale.returncode == 1
    assert "60s old" in stale.stderr or "old (limit 5s)" in stale.stderr
    assert no_dispatcher.returncode == 1


def test_status_shows_backlog(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    assert taskdock("migrate", env=env).returncode == 0

    result = taskdock("status", env=env)

    assert result.returncode == 0, result.stderr
    assert "outbox (due, not yet published): 0" in result.stdout
    assert "running with an expired lease (worker lost): 0" in result.stdout


def test_light_healthcheck_agrees_with_settings(tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.healthcheck import DEFAULTS, main

    fields = Settings.model_fields
    assert DEFAULTS["worker"] == (
        str(fields["worker_heartbeat_file"].default),
        fields["worker_heartbeat_max_age"].default,
    )
    assert DEFAULTS["dispatcher"] == (
        str(fields["dispatcher_heartbeat_file"].default),
        fields["dispatcher_heartbeat_max_age"].default,
    )
    assert main(["nonsense"]) == 2


def test_light_healthcheck_reads_the_heartbeat(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data", TASKDOCK_WORKER_HEARTBEAT_MAX_AGE="5")
    heartbeat = Path(env["TASKDOCK_WORKER_HEARTBEAT_FILE"])

    def check() -> int:
        return subprocess.run(
            [sys.executable, "-m", "app.healthcheck", "worker"], env=env, check=False
        ).returncode

    missing = check()
    heartbeat.parent.mkdir(parents=True, exist_ok=True)
    heartbeat.touch()
    fresh = check()
    os.utime(heartbeat, (time.time() - 60, time.time() - 60))

    assert (missing, fresh, check()) == (1, 0, 1)


def test_a_worker_that_dies_of_an_unrecoverable_error_exits_non_zero(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    # Celery cannot take its pidfile: "Unrecoverable error", and a supervisor must see it.
    result = taskdock("worker", "--pidfile", str(tmp_path / "missing" / "w.pid"), env=env)

    assert "Unrecoverable error" in result.stdout + result.stderr
    assert result.returncode != 0


@pytest.mark.postgres
@pytest.mark.redis
def test_status_flags_a_queue_no_worker_consumes_and_lists_the_workers(
    pg_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.support.services import REDIS_URL, require_redis
    from tests.support.stack import running_stack

    require_redis()
    env = {**pg_env, "TASKDOCK_BROKER_URL": REDIS_URL}
    with running_stack(env, tmp_path / "logs") as stack:
        worker = stack.worker(options=("-Q", "default", "--hostname", "w1@%h"))
        _, base = stack.api()
        side = httpx.post(f"{base}/api/v1/tasks", json={"type": "tests.side", "payload": {}})
        slow = httpx.post(
            f"{base}/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 30}}
        )
        assert side.status_code == slow.status_code == 202
        wait_for(
            lambda: (
                httpx.get(f"{base}/api/v1/tasks/{slow.json()['id']}").json()["status"] == "RUNNING"
            ),
            timeout=30,
            what="the sleep task to run",
        )

        result = taskdock("status", "--workers", env=env)
        metrics = httpx.get(f"{base}/metrics").text
        assert worker.alive()

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    side_line = next(line for line in lines if line.strip().startswith("side "))
    assert "1 waiting" in side_line
    assert "0 workers" in side_line
    assert "NO WORKER consumes this queue" in side_line
    default_line = next(line for line in lines if line.strip().startswith("default "))
    assert "1 worker" in default_line
    assert "NO WORKER" not in default_line
    (worker_line,) = [line for line in lines if line.strip().startswith("w1@")]
    assert "queues=default " in worker_line
    assert "concurrency=1" in worker_line
    assert "active=1" in worker_line
    assert "last heartbeat 0:00:0" in worker_line
    assert 'taskdock_queue_consumers{queue="side"} 0.0' in metrics
    assert 'taskdock_queue_waiting{queue="side"} 1.0' in metrics
    assert 'taskdock_queue_consumers{queue="default"} 1.0' in metrics


def test_the_command_line_loads_no_web_framework_nor_http_client() -> None:
    # Every process imports app.cli to find its command; a worker has no use for FastAPI, and
    # no server for httpx (with it, rich and pygments for httpx's own command line): 60 ms and
    # 6 MB of the API's start (`taskdock tasks` imports the client when it runs).
    heavy = "{'fastapi', 'httpx', 'jinja2', 'rich'}"
    code = f"import sys, app.cli; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
