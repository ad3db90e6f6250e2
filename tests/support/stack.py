"""Run taskdock's processes (API, workers, dispatcher) as real subprocesses."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.services import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment of one test system: its own data, quick leases, the test task types."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TASKDOCK_") and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "TASKDOCK_ENVIRONMENT": "test",
            "TASKDOCK_DATA_DIR": str(data_dir),
            "TASKDOCK_SECRETS_DIR": str(data_dir / "no-secrets"),
            "TASKDOCK_LOG_FORMAT": "json",
            "TASKDOCK_LOG_LEVEL": "INFO",
            "TASKDOCK_TASK_MODULES": "tests.support.tasks",
            "TASKDOCK_TASK_LEASE_SECONDS": "3",
            "TASKDOCK_REAPER_INTERVAL": "0.5",
            "TASKDOCK_DISPATCHER_INTERVAL": "0.2",
            "TASKDOCK_DISPATCH_GRACE_SECONDS": "0.3",
            "TASKDOCK_WORKER_HEARTBEAT_FILE": str(data_dir / "worker.heartbeat"),
            "TASKDOCK_DISPATCHER_HEARTBEAT_FILE": str(data_dir / "dispatcher.heartbeat"),
            "TASKDOCK_METRICS_DIR": str(data_dir / "metrics"),
            "TASKDOCK_WORKER_METRICS_PORT": "0",
            "TASKDOCK_DISPATCHER_METRICS_PORT": "0",
            "TASKDOCK_AUTH_ENABLED": "false",
            "TASKDOCK_TASK_HARD_LIMIT_GRACE": "2",
            # The suite submits far faster than a client should; the limit tests set their own.
            "TASKDOCK_RATE_LIMIT_SUBMIT": "100000/minute",
            "TASKDOCK_RATE_LIMIT_READ": "100000/minute",
            "TASKDOCK_RATE_LIMIT_AUTH_FAILURES": "100000/minute",
        }
    )
    env.update(overrides)
    return env


@dataclass
class Proc:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        handle = self.log.open("ab")
        # Its own session, so a kill reaches the whole process group (pool children too).
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal_group(self, signum: int) -> None:
        if self.alive():
            os.killpg(self.pid, signum)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL to the group if it does not finish in time."""
        if self.process is None:
            return None
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
        self._reap_group()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL to the whole group: the machine pulled out from under it."""
        if self.process is None:
            return
        self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=10)
        self._reap_group()

    def _reap_group(self) -> None:
        # Pool children of a killed worker may linger for a moment; none may outlive the test.
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    """The processes of one test system, all stopped when the test ends."""

    env: dict[str, str]
    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name=name, args=argv, env=env or self.env, log=self.logs / f"{name}.log")
        self.procs.append(proc.start())
        return proc

    def taskdock(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [sys.executable, "-m", "app.cli", *args], env)

    def worker(
        self,
        name: str = "w1",
        *,
        concurrency: int = 1,
        wait: bool = True,
        options: tuple[str, ...] | None = None,
    ) -> Proc:
        """`taskdock worker`; `options` replace the suite's (a node name, no mingle or gossip)."""
        heartbeat = self.logs / f"{name}.heartbeat"
        heartbeat.unlink(missing_ok=True)
        env = {**self.env, "TASKDOCK_WORKER_HEARTBEAT_FILE": str(heartbeat)}
        if options is None:
            options = ("--hostname", f"{name}@%h", "--without-mingle", "--without-gossip")
        proc = self.taskdock(name, "worker", "--concurrency", str(concurrency), *options, env=env)
        if wait:
            wait_for(
                lambda: heartbeat.exists() or not proc.alive(),
                timeout=60,
                what=f"worker {name} to consume",
            )
            assert proc.alive(), proc.output()[-3000:]
        return proc

    def dispatcher(self, name: str = "dispatcher") -> Proc:
        return self.taskdock(name, "dispatcher")

    def api(
        self, name: str = "api", *, workers: int = 1, port: int | None = None
    ) -> tuple[Proc, str]:
        """Start an API server; `port` brings one back where its clients expect it."""
        port = port or free_port()
        proc = self.taskdock(name, "api", "--port", str(port), "--workers", str(workers))
        base = f"http://127.0.0.1:{port}"
        wait_until_answering(proc, f"{base}/health/live")
        return proc, base

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=20)

    def dump_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-4000:]}" for p in self.procs)


def wait_until_answering(proc: Proc, url: str) -> None:
    """Until the API server `proc` answers `url` with 200; at once if it died."""

    def up() -> bool:
        assert proc.alive(), proc.output()[-3000:]
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=60, what=f"api {proc.name}")


@contextmanager
def running_stack(env: dict[str, str], logs: Path) -> Iterator[Stack]:
    stack = Stack(env=env, logs=logs)
    try:
        yield stack
    finally:
        stack.stop_all()


def wait_status(
    client: Any, task_id: str, statuses: set[str], *, timeout: float = 30
) -> dict[str, Any]:
    """Poll the API until the task reaches one of `statuses`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/tasks/{task_id}")
        assert response.status_code == 200, response.text
        last = response.json()
        if last["status"] in statuses:
            return last
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} stuck at {last.get('status')}: {last}")


def taskdock(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run one `taskdock` command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def create_key(env: dict[str, str], *, scopes: str = "submit,read", name: str = "") -> str:
    """A new API key, made as an operator makes one (`taskdock keys create`); a new owner."""
    created = taskdock(
        "keys",
        "create",
        "--name",
        name or f"key-{os.urandom(4).hex()}",
        "--scopes",
        scopes,
        env=env,
    )
    assert created.returncode == 0, created.stderr
    return created.stdout.strip().splitlines()[-1]


@dataclass
class LiveSystem:
    """A whole system as users meet it: its API's base URL, its processes and environment."""

    stack: Stack
    base: str
    env: dict[str, str]

    def new_key(self, scopes: str = "submit,read") -> str:
        return create_key(self.env, scopes=scopes)


@contextmanager
def live_system(root: Path, **settings: str) -> Iterator[LiveSystem]:
    """PostgreSQL (a scratch database), Redis, a worker, a dispatcher and an API with auth on."""
    from tests.support import services

    services.require_postgres()
    services.require_redis()
    with services.scratch_database() as url:
        env = base_env(
            root / "data",
            TASKDOCK_DATABASE_URL=url,
            TASKDOCK_BROKER_URL=services.REDIS_URL,
            TASKDOCK_AUTH_ENABLED="true",
            **settings,
        )
        assert taskdock("migrate", env=env).returncode == 0
        with running_stack(env, root / "logs") as stack:
            stack.worker(concurrency=2)
            stack.dispatcher()
            _, base = stack.api()
            yield LiveSystem(stack, base, env)
