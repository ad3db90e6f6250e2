"""Alembic environment: runs on the connection the caller holds (and has locked)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.auth import models as auth_models  # noqa: F401 - registers the tables
from app.db.base import Base
from app.db.migrate import built_on
from app.schedules import models as schedule_models  # noqa: F401
from app.tasks import models  # noqa: F401 - registers the tables on Base.metadata
from app.webhooks import models as webhook_models  # noqa: F401
from app.workers import models as worker_models  # noqa: F401

target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=built_on(connection.dialect.name),
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    # Run by the `alembic` command (alembic.ini), which is then this process's start.
    from app.core.config import get_settings
    from app.core.db import configure, get_engine

    configure(get_settings(), role="migrate")
    with get_engine().connect() as fresh:
        run_migrations(fresh)
        fresh.commit()
else:
    run_migrations(connection)
