"""The task record.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WAITING = "status IN ('QUEUED', 'RETRYING')"
OUTBOX = f"{WAITING} AND published_at IS NULL"
RUNNING = "status = 'RUNNING'"


def _partial(where: str) -> dict[str, Any]:
    return {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "task",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("type", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("run_after", timestamp, nullable=False),
        sa.Column("published_at", timestamp, nullable=True),
        sa.Column("lease_expires_at", timestamp, nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("request_hash", sa.String(length=64), nullable=True),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.Column("queued_at", timestamp, nullable=True),
        sa.Column("started_at", timestamp, nullable=True),
        sa.Column("finished_at", timestamp, nullable=True),
        sa.CheckConstraint(
            "status IN ('QUEUED', 'RUNNING', 'RETRYING', 'SUCCEEDED', 'FAILED', 'CANCELLED')",
            name=op.f("ck_task_status"),
        ),
        sa.CheckConstraint(
            "attempt >= 1 AND attempt <= max_attempts", name=op.f("ck_task_attempt")
        ),
        sa.CheckConstraint("priority BETWEEN 0 AND 9", name=op.f("ck_task_priority")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task")),
        sa.UniqueConstraint("owner", "idempotency_key", name=op.f("uq_task_owner_idempotency_key")),
    )
    op.create_index("ix_task_owner_created", "task", ["owner", "created_at", "id"])
    op.create_index("ix_task_owner_status_created", "task", ["owner", "status", "created_at", "id"])
    op.create_index("ix_task_owner_type_created", "task", ["owner", "type", "created_at", "id"])
    op.create_index("ix_task_outbox", "task", ["run_after"], **_partial(OUTBOX))
    op.create_index("ix_task_published", "task", ["published_at"], **_partial(WAITING))
    op.create_index("ix_task_lease", "task", ["lease_expires_at"], **_partial(RUNNING))


def downgrade() -> None:
    for index in (
        "ix_task_lease",
        "ix_task_published",
        "ix_task_outbox",
        "ix_task_owner_type_created",
        "ix_task_owner_status_created",
        "ix_task_owner_created",
    ):
        op.drop_index(index, table_name="task")
    op.drop_table("task")
