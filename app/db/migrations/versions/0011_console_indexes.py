"""Indexes for the console: every owner's tasks newest first, by status, and by finish time.

An admin (or `taskdock dev`) sees every owner's tasks: without these, its list page and its
overview's counts and chart would sort or scan the whole table.

Revision ID: 0011
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FINISHED = "finished_at IS NOT NULL"


def upgrade() -> None:
    op.create_index("ix_task_created", "task", ["created_at", "id"])
    op.create_index("ix_task_status_created", "task", ["status", "created_at", "id"])
    op.create_index(
        "ix_task_finished",
        "task",
        ["finished_at"],
        postgresql_where=sa.text(_FINISHED),
        sqlite_where=sa.text(_FINISHED),
    )


def downgrade() -> None:
    op.drop_index("ix_task_finished", table_name="task")
    op.drop_index("ix_task_status_created", table_name="task")
    op.drop_index("ix_task_created", table_name="task")
