"""The unique (schedule_id, schedule_slot) index holds scheduled tasks only.

Every other task has NULLs there, which never conflict, yet each of its writes added an entry:
its INSERT, and its claim and outcome too, since a status change is never a heap-only update.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEDULED = "schedule_id IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_task_schedule_slot", table_name="task")
    op.create_index(
        "ix_task_schedule_slot",
        "task",
        ["schedule_id", "schedule_slot"],
        unique=True,
        postgresql_where=sa.text(SCHEDULED),
        sqlite_where=sa.text(SCHEDULED),
    )


def downgrade() -> None:
    op.drop_index("ix_task_schedule_slot", table_name="task")
    op.create_index("ix_task_schedule_slot", "task", ["schedule_id", "schedule_slot"], unique=True)
