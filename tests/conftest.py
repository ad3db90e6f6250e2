"""Fixtures: isolated systems on the embedded default and on the machine's real servers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support import services
from tests.support.stack import Stack, base_env, running_stack

BACKENDS = ["embedded", "postgres-redis", "postgres-rabbitmq"]


def reset_caches() -> None:
    from app.core.config import get_settings
    from app.core.db import reset_engine

    get_settings.cache_clear()
    reset_engine()


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Point this process's settings, engine and Celery app at a given environment."""

    def apply(env: dict[str, str]) -> None:
        for key in list(os.environ):
            if key.startswith("TASKDOCK_"):
                monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("TASKDOCK_"):
                monkeypatch.setenv(key, value)
        reset_caches()
        from app.core.config import get_settings
        from app.core.db import configure
        from app.tasks.registry import load_task_modules

        # What a process's start does (app.main, app.worker.celery, app.cli).
        settings = get_settings()
        configure(settings, role="api")
        load_task_modules(settings.task_modules)

    yield apply
    reset_caches()


def migrate_now() -> None:
    from app.core.db import get_engine
    from app.db.migrate import upgrade

    upgrade(get_engine())


@pytest.fixture
def embedded_env(tmp_path: Path, configure: object) -> dict[str, str]:
    env = base_env(tmp_path / "data")
    configure(env)  # type: ignore[operator]
    migrate_now()
    return env


@pytest.fixture
def embedded_client(embedded_env: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


def backend_env(
    kind: str, data_dir: Path, database_url: str | None, **extra: str
) -> dict[str, str]:
    overrides = dict(extra)
    if kind != "embedded":
        assert database_url is not None
        overrides["TASKDOCK_DATABASE_URL"] = database_url
        if kind == "postgres-redis":
            services.require_redis()
            overrides["TASKDOCK_BROKER_URL"] = services.REDIS_URL
        else:
            services.require_rabbitmq()
            overrides["TASKDOCK_BROKER_URL"] = services.RABBITMQ_URL
    return base_env(data_dir, **overrides)


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, configure: object
) -> Iterator[dict[str, str]]:
    """Each backend in turn: SQLite + filesystem, PostgreSQL + Redis, PostgreSQL + RabbitMQ."""
    kind: str = request.param
    if kind == "embedded":
        env = backend_env(kind, tmp_path / "data", None)
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env
        return
    with services.scratch_database() as url:
        env = backend_env(kind, tmp_path / "data", url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env


@pytest.fixture
def stack(backend: dict[str, str], tmp_path: Path) -> Iterator[Stack]:
    with running_stack(backend, tmp_path / "logs") as running:
        yield running


@pytest.fixture
def client(backend: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture
def pg_env(tmp_path: Path, configure: object) -> Iterator[dict[str, str]]:
    """PostgreSQL with the filesystem broker: database behaviour without a broker server."""
    with services.scratch_database() as url:
        env = base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env
