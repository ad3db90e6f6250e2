"""Indexes for the console: every owner's tasks newest first, and by status.

An admin sees every owner's tasks: without these, its list page and its
overview's counts would sort or scan the whole table. Its chart reads migration 0009's
ix_task_finished.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_task_created", "task", ["created_at", "id"])
    op.create_index("ix_task_status_created", "task", ["status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_task_status_created", table_name="task")
    op.drop_index("ix_task_created", table_name="task")
