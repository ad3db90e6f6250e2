"""Retention: an index on finished records, for the dispatcher's purge.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    # Built in the migration's transaction, which holds off writes to `task` while it builds. Not
    # CONCURRENTLY: that waits for every open transaction, among them a second `taskdock
    # migrate` waiting for the migration lock, and PostgreSQL ends the pair as a deadlock. A
    # deployment with millions of records builds it beforehand without blocking (the upgrade then
    # finds it): docs/retention.md gives the statement.
    op.create_index(
        "ix_task_finished",
        "task",
        ["status", "finished_at"],
        postgresql_where=FINISHED,
        sqlite_where=FINISHED,
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("ix_task_finished", table_name="task")
