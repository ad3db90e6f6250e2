"""Real services for the tests: the machine's servers, and private ones the fault tests own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

CI = os.environ.get("CI", "").lower() == "true"

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def require(name: str, available: bool, how: str) -> None:
    """Under CI a missing service fails the test; on a laptop it skips with the reason."""
    if available:
        return
    message = f"{name} is not reachable ({how})"
    if CI:
        pytest.fail(f"{message}; CI=true requires it")
    pytest.skip(message)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_postgres() -> None:
    require("PostgreSQL", port_open(PG_HOST, PG_PORT), f"{PG_HOST}:{PG_PORT}")


def require_redis() -> None:
    require("Redis", port_open("127.0.0.1", 6379), "127.0.0.1:6379")


def require_rabbitmq() -> None:
    require("RabbitMQ", port_open("127.0.0.1", 5672), "127.0.0.1:5672")


def pg_url(database: str) -> str:
    return f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    require_postgres()
    name = f"taskdock_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url("postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield pg_url(name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


class RedisServer:
    """A private redis-server on a free port, which a fault test may stop and start."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        require("redis-server", binary is not None, "the redis-server binary")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                str(binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--maxmemory-policy",
                "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open("127.0.0.1", self.port), timeout=10, what="redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


class RabbitMQServer:
    """A private RabbitMQ node on free ports, which a fault test may kill and start again.

    Its own node name, ports and data directory: the machine's shared node is never touched.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.dist_port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> None:
        packaged = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
        binary = str(packaged) if packaged.exists() else shutil.which("rabbitmq-server")
        require("rabbitmq-server", binary is not None, "the rabbitmq-server binary")
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "HOME": str(self.workdir),
            "RABBITMQ_NODENAME": f"taskdock{self.port}@localhost",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "none"),
            "RABBITMQ_PID_FILE": str(self.workdir / "pid"),
        }
        with (self.workdir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(lambda: port_open("127.0.0.1", self.port), timeout=90, what="rabbitmq-server")

    def kill(self) -> None:
        """SIGKILL to the node: a crash, with no orderly shutdown."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None


class PostgresServer:
    """A private PostgreSQL cluster on a free port, which a fault test may crash and restart.

    PostgreSQL refuses to run as root, so as root every command runs as the `postgres`
    user, in a directory of its own under /tmp (pytest's tmp_path is closed to other users).
    """

    def __init__(
        self,
        version_root: Path = Path("/usr/lib/postgresql"),
        settings: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.bindir = _postgres_bindir(version_root)
        self.workdir: Path | None = None
        # Server settings on top of this class's own (`-c name=value`).
        self.settings = settings or {}

    @property
    def data(self) -> Path:
        assert self.workdir is not None, "start() first"
        return self.workdir / "data"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database of this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        """The libpq URL (plain psycopg) of one database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts connections."""
        require("PostgreSQL binaries", self.bindir is not None, "initdb and pg_ctl")
        if self.workdir is None:
            self._init()
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
                  "-l", str(self.log), "-o", options)  # fmt: skip

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, clients cut off, recovery at the next start."""
        self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))

    def stop(self) -> None:
        """Stop the cluster if it runs, and remove its files."""
        if self.workdir is None:
            return
        if (self.data / "postmaster.pid").exists():
            try:
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-m", "fast", "-D", str(self.data))
            except subprocess.CalledProcessError:
                self._kill_postmaster()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None

    def create_database(self, name: str) -> str:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    @property
    def log(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "postgres.log"

    def _init(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="taskdock-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.workdir, user="postgres", group="postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--no-sync")  # fmt: skip

    def _run(self, tool: str, *args: str) -> None:
        assert self.bindir is not None
        argv = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, timeout=90)

    def _kill_postmaster(self) -> None:
        # pg_ctl failed: end the postmaster we started by its recorded PID, nothing broader.
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError, ProcessLookupError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


def _postgres_bindir(root: Path) -> Path | None:
    """The newest installed version's bin directory, or pg_ctl's on PATH."""
    versions = sorted(
        (path for path in root.glob("*/bin") if (path / "pg_ctl").exists()),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@contextmanager
def private_postgres(settings: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """A started private cluster, stopped and removed afterwards."""
    server = PostgresServer(settings=settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def wait_for(condition: object, *, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


_celery_apps: dict[int, tuple[Any, Any]] = {}


def celery_app() -> Any:
    """The Celery app of this process's current settings, as an entry point would build it."""
    from app.core.celery import create_celery_app
    from app.core.config import get_settings

    settings = get_settings()
    found = _celery_apps.get(id(settings))
    if found is None or found[0] is not settings:
        found = _celery_apps[id(settings)] = (settings, create_celery_app(settings))
    return found[1]
