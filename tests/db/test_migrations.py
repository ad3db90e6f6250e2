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
            # As env.py compares: what the models build on one dialect only is left out of the
            # other's comparison.
            include = migrate.built_on(connection.dialect.name)
            context = MigrationContext.configure(connection, opts={"include_object": include})
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


def test_sqlite_numbers_a_change_without_reading_every_task(tmp_path: Path) -> None:
    # SQLite has no sequence: a trigger numbers each status change MAX(change_seq) + 1. Read
    # through the (owner, change_seq) index alone, that MAX walked every task, three times per
    # task, and `taskdock dev` slowed with each task it had run. Counted in SQLite's virtual
    # machine steps (its progress handler), not in time: a change at 4,000 tasks must cost
    # what it costs at 40.
    import sqlite3
    import uuid

    path = tmp_path / "dev.db"
    engine = create_engine(f"sqlite:///{path}")
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    connection = sqlite3.connect(path)
    insert = (
        "INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts,"
        " deliveries, run_after, owner, created_at, updated_at)"
        " VALUES (?, 't', '{}', 'QUEUED', 'default', 5, 1, 1, 0, '2026-12-04', '',"
        " '2026-12-04', '2026-12-04')"
    )

    def add(count: int) -> str:
        ids = [uuid.uuid4().hex for _ in range(count)]
        connection.executemany(insert, [(id_,) for id_ in ids])
        connection.commit()
        return ids[-1]

    def steps_to_start(task_id: str) -> int:
        steps = 0

        def step() -> int:
            nonlocal steps
            steps += 1
            return 0  # go on

        connection.set_progress_handler(step, 1)
        connection.execute("UPDATE task SET status = 'RUNNING' WHERE id = ?", (task_id,))
        connection.set_progress_handler(None, 1)
        connection.commit()
        return steps

    try:
        small = steps_to_start(add(40))
        large = steps_to_start(add(4000))
        numbers = [row[0] for row in connection.execute("SELECT change_seq FROM task")]
    finally:
        connection.close()
    assert large < 2 * small, (small, large)
    # Still numbered: 4,040 inserts, then two status changes that each took the next number.
    assert len(set(numbers)) == len(numbers) == 4040
    assert max(numbers) == 4042
