"""The garbage collector at start (app/core/collector.py): every `taskdock` process runs with it
on once built, with what its start made frozen, and a pool child inherits that."""

from __future__ import annotations

import gc
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core import collector
from tests.support.services import free_port, wait_for
from tests.support.stack import Proc, Stack, base_env, wait_status, wait_until_answering

# `taskdock ARGS` as its console script runs it, telling the collector's state at exit and on
# SIGUSR2 (which neither uvicorn nor Celery uses; uvicorn ends on the signal it stopped for,
# without running atexit).
PROBE = """
import atexit, gc, signal, sys
def report(*_):
    print(f"collector enabled={gc.isenabled()} frozen={gc.get_freeze_count()}", flush=True)
signal.signal(signal.SIGUSR2, report)
atexit.register(report)
sys.argv[0] = "taskdock"
from app.cli import main
main()
"""
# Far more than anything made after start: the modules, models and routes of a built process.
STARTUP_OBJECTS = 50_000


@pytest.fixture
def unfrozen() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()


def state(output: str) -> tuple[bool, int]:
    found = re.search(r"collector enabled=(\w+) frozen=(\d+)", output)
    assert found, output[-3000:]
    return found[1] == "True", int(found[2])


def reported(proc: Proc) -> tuple[bool, int]:
    proc.process.send_signal(signal.SIGUSR2)  # type: ignore[union-attr]
    wait_for(
        lambda: "collector enabled=" in proc.output(), timeout=10, what=f"{proc.name}'s report"
    )
    return state(proc.output())


def probe(stack: Stack, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
    return stack.spawn(name, [sys.executable, "-c", PROBE, *args], env)


def test_resume_freezes_what_exists_and_turns_the_collector_on(unfrozen: None) -> None:
    collector.pause()
    assert not gc.isenabled()

    collector.resume()

    assert gc.isenabled()
    assert gc.get_freeze_count() > STARTUP_OBJECTS


def test_resume_leaves_a_running_collector_alone(unfrozen: None) -> None:
    # The tests and `uvicorn app.main:app` never paused it: nothing to freeze for them.
    assert gc.isenabled()

    collector.resume()

    assert gc.get_freeze_count() == 0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres-redis"], indirect=True)
def test_the_api_dispatcher_and_worker_collect_with_their_start_frozen(
    stack: Stack, client: TestClient
) -> None:
    port = free_port()
    api = probe(stack, "api", "api", "--port", str(port))
    wait_until_answering(api, f"http://127.0.0.1:{port}/health/ready")
    heartbeat = Path(stack.env["TASKDOCK_DISPATCHER_HEARTBEAT_FILE"])
    heartbeat.unlink(missing_ok=True)
    dispatcher = probe(stack, "dispatcher", "dispatcher")
    wait_for(heartbeat.exists, timeout=60, what="the dispatcher's heartbeat")
    beat = stack.logs / "w.heartbeat"
    env = {**stack.env, "TASKDOCK_WORKER_HEARTBEAT_FILE": str(beat)}
    worker = probe(
        stack, "w", "worker", "--concurrency", "1", "--without-mingle", "--without-gossip", env=env
    )
    wait_for(beat.exists, timeout=60, what="the worker to consume")
    response = client.post("/api/v1/tasks", json={"type": "tests.collector", "payload": {}})
    assert response.status_code == 202, response.text

    done = wait_status(client, response.json()["id"], {"SUCCEEDED", "FAILED"})

    # The pool child that ran it: forked from a parent that had frozen its start.
    assert done["status"] == "SUCCEEDED", done
    assert done["result"]["enabled"] is True
    assert done["result"]["frozen"] > STARTUP_OBJECTS
    assert done["result"]["pid"] != worker.pid
    for proc in (api, dispatcher, worker):
        enabled, frozen = reported(proc)
        assert enabled, proc.name
        assert frozen > STARTUP_OBJECTS, proc.name


def test_other_commands_run_with_the_collector_on(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "migrate"],
        env=base_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    # `taskdock` paused it; a command that is not a server turned it back on as it started.
    assert done.returncode == 0, done.stderr[-3000:]
    enabled, _ = state(done.stdout)
    assert enabled
