"""The task record: the single source of truth about every task."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow
from app.schedules import models as _schedules  # noqa: F401 - the table schedule_id refers to
from app.tasks.states import RunOutcome, TaskStatus

_STATUSES = ", ".join(f"'{status.value}'" for status in TaskStatus)
_WAITING_UNPUBLISHED = "status IN ('QUEUED', 'RETRYING') AND published_at IS NULL"
_WAITING = "status IN ('QUEUED', 'RETRYING')"
_RUNNING = "status = 'RUNNING'"
# Tasks with a webhook not yet handed to the webhook sender (app/webhooks/delivery.py).
_NOTIFY_OWED = "notify_url IS NOT NULL AND notified_at IS NULL"
_FINISHED = "finished_at IS NOT NULL"
_SCHEDULED = "schedule_id IS NOT NULL"


class Task(Base):
    __tablename__ = "task"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    type: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Stored as its text (VARCHAR(16), checked by the constraint below), read back as the enum.
    status: Mapped[TaskStatus] = mapped_column(
        Enum(
            TaskStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda statuses: [status.value for status in statuses],
            validate_strings=True,
        ),
        default=TaskStatus.QUEUED,
    )
    queue: Mapped[str] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # The attempt number fences out a late, stale run; deliveries count hand-outs of this attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    max_attempts: Mapped[int] = mapped_column(Integer)
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(255))
    result: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Empty for anonymous submissions, so (owner, key) stays unique: NULLs never collide.
    owner: Mapped[str] = mapped_column(String(100), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    # The submitting request's X-Request-ID, carried to every run's log lines.
    request_id: Mapped[str | None] = mapped_column(String(128))
    # Where the final record is POSTed (app/webhooks); notified_at: when its delivery was made.
    notify_url: Mapped[str | None] = mapped_column(String(2000))
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A scheduled task's schedule and slot: the unique pair is why no slot ever fires twice.
    schedule_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("schedule.id", ondelete="SET NULL")
    )
    schedule_slot: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set by migration 0010's trigger at every status change, from one increasing sequence:
    # the event id of app/tasks/events.py. Never written by the application.
    change_seq: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        CheckConstraint("attempt >= 1 AND attempt <= max_attempts", name="attempt"),
        UniqueConstraint("owner", "idempotency_key"),
        # The list endpoint: newest first, optionally by status or type, keyset on (created_at, id).
        Index("ix_task_owner_created", "owner", "created_at", "id"),
        Index("ix_task_owner_status_created", "owner", "status", "created_at", "id"),
        Index("ix_task_owner_type_created", "owner", "type", "created_at", "id"),
        # A unique index, not a constraint: SQLite cannot add a constraint to a table. Partial:
        # the other tasks' NULLs never conflict, and would cost an entry at every write.
        Index(
            "ix_task_schedule_slot",
            "schedule_id",
            "schedule_slot",
            unique=True,
            postgresql_where=text(_SCHEDULED),
            sqlite_where=text(_SCHEDULED),
        ),
        # The event stream's replay after a Last-Event-ID (app/tasks/events.py).
        Index("ix_task_owner_change_seq", "owner", "change_seq"),
        # SQLite numbers a change MAX(change_seq) + 1 (migration 0010's triggers), which needs
        # an index of change_seq alone; PostgreSQL uses a sequence (migration 0016).
        Index("ix_task_change_seq", "change_seq").ddl_if(dialect="sqlite"),
        # The console as an admin sees it: every owner's tasks, newest first or by status (its
        # chart of what finished in the last hour reads ix_task_finished, below).
        Index("ix_task_created", "created_at", "id"),
        Index("ix_task_status_created", "status", "created_at", "id"),
        # The dispatcher's outbox scan and the reaper's lease scan touch only these rows.
        Index(
            "ix_task_outbox",
            "run_after",
            postgresql_where=text(_WAITING_UNPUBLISHED),
            sqlite_where=text(_WAITING_UNPUBLISHED),
        ),
        Index(
            "ix_task_published",
            "published_at",
            postgresql_where=text(_WAITING),
            sqlite_where=text(_WAITING),
        ),
        Index(
            "ix_task_notify",
            "finished_at",
            postgresql_where=text(_NOTIFY_OWED),
            sqlite_where=text(_NOTIFY_OWED),
        ),
        Index(
            "ix_task_lease",
            "lease_expires_at",
            postgresql_where=text(_RUNNING),
            sqlite_where=text(_RUNNING),
        ),
        # The retention purge's scan (app.tasks.retention): finished rows only, so a run's
        # claim and lease writes never touch it; only its final write adds an entry.
        Index(
            "ix_task_finished",
            "status",
            "finished_at",
            postgresql_where=text(_FINISHED),
            sqlite_where=text(_FINISHED),
        ),
    )


_OUTCOMES = ", ".join(f"'{outcome.value}'" for outcome in RunOutcome)


class TaskRun(Base):
    """One run: one delivery of one attempt, kept after the task has moved on.

    Written by the statements that move the task (the claim, the outcome, the cancel, the
    reaper), so it never disagrees with the record; the task row keeps only the latest state.
    """

    __tablename__ = "task_run"

    # No foreign key (migration 0015: its check cost the claim a lookup and a row lock): every
    # writer of a run has just updated its task, and the purge deletes a task's runs with it.
    task_id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker: Mapped[str | None] = mapped_column(String(255))
    outcome: Mapped[RunOutcome] = mapped_column(
        Enum(
            RunOutcome,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda outcomes: [outcome.value for outcome in outcomes],
            validate_strings=True,
        )
    )
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (CheckConstraint(f"outcome IN ({_OUTCOMES})", name="outcome"),)


# The API processes whose event hub listens now (app/tasks/events.py): migration 0013's trigger
# sends a status change's notification only while a row is here. UNLOGGED on PostgreSQL (the
# migration says so; a crash empties it); on SQLite it stays empty.
task_event_listener = Table(
    "task_event_listener",
    Base.metadata,
    Column("pid", Integer, primary_key=True, autoincrement=False),
    Column("since", UTCDateTime, nullable=False),
)
# Rows whose connection is gone: an API process killed while it listened.
FORGET_DEAD_LISTENERS = (
    "DELETE FROM task_event_listener WHERE pid NOT IN (SELECT pid FROM pg_stat_activity)"
)
