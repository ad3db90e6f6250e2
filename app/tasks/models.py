"""The task record: the single source of truth about every task."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Enum, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow
from app.tasks.states import TaskStatus

_STATUSES = ", ".join(f"'{status.value}'" for status in TaskStatus)
_WAITING_UNPUBLISHED = "status IN ('QUEUED', 'RETRYING') AND published_at IS NULL"
_WAITING = "status IN ('QUEUED', 'RETRYING')"
_RUNNING = "status = 'RUNNING'"


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
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        CheckConstraint("attempt >= 1 AND attempt <= max_attempts", name="attempt"),
        UniqueConstraint("owner", "idempotency_key"),
        # The list endpoint: newest first, optionally by status or type, keyset on (created_at, id).
        Index("ix_task_owner_created", "owner", "created_at", "id"),
        Index("ix_task_owner_status_created", "owner", "status", "created_at", "id"),
        Index("ix_task_owner_type_created", "owner", "type", "created_at", "id"),
        # The console as an admin sees it: every owner's tasks, newest first or by status, and
        # what finished in the last hour (its overview's chart).
        Index("ix_task_created", "created_at", "id"),
        Index("ix_task_status_created", "status", "created_at", "id"),
        Index(
            "ix_task_finished",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
            sqlite_where=text("finished_at IS NOT NULL"),
        ),
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
            "ix_task_lease",
            "lease_expires_at",
            postgresql_where=text(_RUNNING),
            sqlite_where=text(_RUNNING),
        ),
    )
