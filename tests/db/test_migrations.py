"""The same migrations, up and down, on PostgreSQL and SQLite; concurrent upgrades never race."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, text

from app.db import migrate
from app.db.base import Base
from tests.support import services
from tests.support.stack import ROOT, base_env

HEAD = ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'migrations.db'}"
        return
    with services.scratch_database() as url:
        yield url


def outbox_triggers(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'task_outbox%'")
            ).scalars()
        )


def test_upgrade_to_head_and_downgrade_to_base(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        migrate.upgrade(engine)
        assert migrate.current(engine) == HEAD
        inspector = inspect(engine)
        assert "task" in inspector.get_table_names()
        columns = {column["name"] for column in inspector.get_columns("task")}
        assert columns == set(Base.metadata.tables["task"].columns.keys())
        indexes = {index["name"] for index in inspector.get_indexes("task")}
        assert {"ix_task_outbox", "ix_task_lease", "ix_task_owner_created"} <= indexes

        if engine.dialect.name == "postgresql":
            assert outbox_triggers(engine) == ["task_outbox_notify"]

        migrate.downgrade(engine, "base")
        assert migrate.current(engine) is None
        assert "task" not in inspect(engine).get_table_names()
        if engine.dialect.name == "postgresql":
            assert outbox_triggers(engine) == []

        migrate.upgrade(engine)
        assert migrate.current(engine) == HEAD
    finally:
        engine.dispose()


def test_models_match_the_migrations(database_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(database_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection)
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    # Only the column type of our UTC wrapper may differ in name; nothing structural.
    assert [change for change in diff if change[0] not in ("modify_type",)] == []


def test_concurrent_migrate_commands_do_not_race(tmp_path: Path) -> None:
    with services.scratch_database() as url:
        env = base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=url)
        commands = [
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", "migrate"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(4)
        ]
        outputs = [command.communicate(timeout=120)[0].decode() for command in commands]
        codes = [command.returncode for command in commands]
        engine = create_engine(url)
        try:
            assert migrate.current(engine) == HEAD
        finally:
            engine.dispose()
    assert codes == [0, 0, 0, 0], outputs
    assert all(f"database at revision {HEAD}" in output for output in outputs)
