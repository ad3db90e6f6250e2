"""Schedules, and the schedule and slot each fired task came from.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ACTIVE = "NOT schedule.paused"


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "schedule",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("owner", sa.String(length=100), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("type", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("queue", sa.String(length=100), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("cron", sa.String(length=200), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("interval_seconds", sa.Integer(), nullable=True),
        sa.Column("anchor_at", timestamp, nullable=False),
        sa.Column("overlap", sa.String(length=8), nullable=False),
        sa.Column("catchup", sa.String(length=8), nullable=False),
        sa.Column("catchup_window_seconds", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("next_fire_at", timestamp, nullable=False),
        sa.Column("last_slot_at", timestamp, nullable=True),
        sa.Column("last_task_id", sa.Uuid(), nullable=True),
        sa.Column("fired_count", sa.Integer(), nullable=False),
        sa.Column("skipped_count", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("updated_at", timestamp, nullable=False),
        sa.CheckConstraint(
            "(cron IS NULL) <> (interval_seconds IS NULL)",
            name=op.f("ck_schedule_cron_or_interval"),
        ),
        sa.CheckConstraint(
            "interval_seconds IS NULL OR interval_seconds >= 1", name=op.f("ck_schedule_interval")
        ),
        sa.CheckConstraint("priority BETWEEN 0 AND 9", name=op.f("ck_schedule_priority")),
        sa.CheckConstraint("overlap IN ('allow', 'skip')", name=op.f("ck_schedule_overlap")),
        sa.CheckConstraint("catchup IN ('latest', 'all')", name=op.f("ck_schedule_catchup")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedule")),
        sa.UniqueConstraint("owner", "name", name=op.f("uq_schedule_owner_name")),
    )
    op.create_index(
        "ix_schedule_owner_created", "schedule", ["owner", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_schedule_due",
        "schedule",
        ["next_fire_at"],
        unique=False,
        postgresql_where=sa.text(ACTIVE),
        sqlite_where=sa.text(ACTIVE),
    )
    # Batch mode on SQLite copies the table to add the foreign key; PostgreSQL alters it.
    with op.batch_alter_table("task") as batch:
        batch.add_column(sa.Column("schedule_id", sa.Uuid(), nullable=True))
        batch.add_column(sa.Column("schedule_slot", timestamp, nullable=True))
        batch.create_foreign_key(
            op.f("fk_task_schedule_id_schedule"),
            "schedule",
            ["schedule_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index("ix_task_schedule_slot", ["schedule_id", "schedule_slot"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.drop_index("ix_task_schedule_slot")
        batch.drop_constraint(op.f("fk_task_schedule_id_schedule"), type_="foreignkey")
        batch.drop_column("schedule_slot")
        batch.drop_column("schedule_id")
    op.drop_index("ix_schedule_due", table_name="schedule")
    op.drop_index("ix_schedule_owner_created", table_name="schedule")
    op.drop_table("schedule")
