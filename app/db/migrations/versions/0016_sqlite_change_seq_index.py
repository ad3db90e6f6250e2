"""SQLite numbers each task change from an index on change_seq alone.

SQLite has no sequence: migration 0010's triggers number a change `MAX(change_seq) + 1`. With
only the event stream's (owner, change_seq) index, that MAX read the whole index, three times a
task (its insert, its claim, its outcome): 0.6 ms each at 20,000 tasks, so `taskdock dev` slowed
with every task it had ever run (332 -> 198 tasks a second over its first 12,000). On an index
of change_seq alone it is one lookup (2 µs). PostgreSQL numbers changes from a sequence and gets
no such index: it would be one more entry to write at every status change.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.create_index("ix_task_change_seq", "task", ["change_seq"])


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.drop_index("ix_task_change_seq", table_name="task")
