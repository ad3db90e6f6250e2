"""A schedule: a task type and payload fired on a cron in a time zone, or every N seconds."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow


class Overlap(StrEnum):
    ALLOW = "allow"
    SKIP = "skip"  # no new task while the schedule's previous task is unfinished


class Catchup(StrEnum):
    LATEST = "latest"  # after downtime, only the most recent missed slot
    ALL = "all"  # every missed slot within catchup_window_seconds, once each


class Source(StrEnum):
    API = "api"
    CODE = "code"  # declared next to its task type; kept in step by the dispatcher


# Matches the partial index ix_schedule_due on both dialects (SQLAlchemy would write `= 0`).
ACTIVE = "NOT schedule.paused"


class Schedule(Base):
    __tablename__ = "schedule"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Stable names let code-declared schedules be found again at each start; optional for others.
    name: Mapped[str | None] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(100), default="")
    source: Mapped[str] = mapped_column(String(8), default=Source.API.value)
    type: Mapped[str] = mapped_column(String(200))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    queue: Mapped[str | None] = mapped_column(String(100))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    cron: Mapped[str | None] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    interval_seconds: Mapped[int | None] = mapped_column(Integer)
    notify_url: Mapped[str | None] = mapped_column(String(2000))
    # Interval slots are anchor + k * interval_seconds.
    anchor_at: Mapped[datetime] = mapped_column(UTCDateTime)
    overlap: Mapped[str] = mapped_column(String(8), default=Overlap.ALLOW.value)
    catchup: Mapped[str] = mapped_column(String(8), default=Catchup.LATEST.value)
    catchup_window_seconds: Mapped[int] = mapped_column(Integer, default=3600)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    # The next slot to fire: the dispatcher's query is a range scan of ix_schedule_due.
    next_fire_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_slot_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The latest task fired, for the overlap policy; no foreign key, so tasks stay deletable.
    last_task_id: Mapped[uuid.UUID | None] = mapped_column()
    fired_count: Mapped[int] = mapped_column(Integer, default=0)
    skipped_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    __table_args__ = (
        CheckConstraint("(cron IS NULL) <> (interval_seconds IS NULL)", name="cron_or_interval"),
        CheckConstraint("interval_seconds IS NULL OR interval_seconds >= 1", name="interval"),
        CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
        CheckConstraint("overlap IN ('allow', 'skip')", name="overlap"),
        CheckConstraint("catchup IN ('latest', 'all')", name="catchup"),
        UniqueConstraint("owner", "name"),
        Index("ix_schedule_owner_created", "owner", "created_at", "id"),
        Index(
            "ix_schedule_due",
            "next_fire_at",
            postgresql_where=text(ACTIVE),
            sqlite_where=text(ACTIVE),
        ),
    )
