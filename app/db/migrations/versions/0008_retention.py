"""Retention: an index on finished records, for the dispatcher's purge.

Revision ID: 0008
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    # CONCURRENTLY on PostgreSQL: a deployment that kept every record so far may have millions,
    # and a plain CREATE INDEX would hold off every write (submits, workers) while it builds.
    # It cannot run in a transaction, hence the autocommit block.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_task_finished",
            "task",
            ["status", "finished_at"],
            postgresql_where=FINISHED,
            sqlite_where=FINISHED,
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    op.drop_index("ix_task_finished", table_name="task")
