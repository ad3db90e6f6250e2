"""The API as a real uvicorn server: graceful SIGTERM and JSON logs on stdout."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.stack import Stack, base_env, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture
def api_stack(tmp_path: Path) -> Iterator[Stack]:
    env = base_env(tmp_path / "data")
    with running_stack(env, tmp_path / "logs") as stack:
        migrate = stack.taskdock("migrate", "migrate")
        assert migrate.process is not None
        assert migrate.process.wait(timeout=60) == 0
        yield stack


def test_sigterm_lets_in_flight_requests_finish(api_stack: Stack) -> None:
    proc, base = api_stack.api()
    outcome: dict[str, object] = {}
    body_started = threading.Event()

    def slow_body() -> Iterator[bytes]:
        yield b'{"type": "process_data", '
        body_started.set()
        time.sleep(1.5)  # the server receives SIGTERM while this request is half-sent
        yield b'"payload": {"user_id": 1, "data": "late"}}'

    def send() -> None:
        try:
            response = httpx.post(
                f"{base}/api/v1/tasks",
                content=slow_body(),
                headers={"content-type": "application/json"},
                timeout=30,
            )
            outcome["status"] = response.status_code
        except httpx.HTTPError as exc:
            outcome["error"] = repr(exc)

    client = threading.Thread(target=send)
    client.start()
    assert body_started.wait(10)
    time.sleep(0.3)
    stopped_at = time.monotonic()
    assert proc.process is not None
    proc.process.send_signal(signal.SIGTERM)
    client.join(timeout=30)
    code = proc.process.wait(timeout=30)

    assert outcome == {"status": 202}, proc.output()[-3000:]
    # uvicorn re-raises the signal once it has shut down cleanly, so the parent sees SIGTERM.
    assert code in (0, -signal.SIGTERM)
    assert "Finished server process" in proc.output()
    assert time.monotonic() - stopped_at < 10


def test_logs_are_json_lines_on_stdout(api_stack: Stack) -> None:
    proc, base = api_stack.api()
    httpx.get(f"{base}/health/live")
    httpx.get(f"{base}/api/v1/tasks/not-a-uuid")
    proc.stop()

    lines = [line for line in proc.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    assert any(r["logger"] == "uvicorn.access" and "/health/live" in r["message"] for r in records)
