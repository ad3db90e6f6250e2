"""What the schedules API accepts and returns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schedules.models import Catchup, Overlap
from app.schedules.slots import cron_problem, zone_problem
from app.tasks.schemas import QUEUE_PATTERN
from app.webhooks.guard import url_problem

MAX_INTERVAL = 366 * 24 * 3600
MAX_WINDOW = 7 * 24 * 3600
DEFAULT_WINDOW = 3600


def _cron(value: str | None) -> str | None:
    if value is not None:
        value = " ".join(value.split())
        problem = cron_problem(value)
        if problem is not None:
            raise ValueError(problem)
    return value


def _notify_url(value: str | None) -> str | None:
    # Its address is checked by the route (app.webhooks.guard), as a submission's.
    if value is not None:
        url_problem(value)
    return value


def _zone(value: str | None) -> str | None:
    if value is not None:
        value = value.strip()
        problem = zone_problem(value)
        if problem is not None:
            raise ValueError(problem)
    return value


class ScheduleFields(BaseModel):
    """What a schedule's owner may set; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    payload: dict[str, Any] = Field(
        default_factory=dict, description="Validated by the type's input model."
    )
    queue: str | None = Field(
        default=None, pattern=QUEUE_PATTERN, description="Overrides the type's queue."
    )
    priority: int = Field(default=0, ge=0, le=9, description="9 runs first.")
    cron: str | None = Field(
        default=None,
        max_length=200,
        description="5 fields (minute hour day-of-month month day-of-week), in `timezone`.",
    )
    timezone: str = Field(
        default="UTC", max_length=64, description="An IANA zone for `cron`, e.g. Europe/Berlin."
    )
    interval_seconds: int | None = Field(
        default=None, ge=1, le=MAX_INTERVAL, description="Fire every N seconds instead of a cron."
    )
    overlap: Overlap = Field(
        default=Overlap.ALLOW,
        description="`skip`: no new task while this schedule's previous one is unfinished.",
    )
    catchup: Catchup = Field(
        default=Catchup.LATEST,
        description="After downtime: `latest` fires the most recent missed slot only; `all` "
        "fires each missed slot within `catchup_window_seconds` once.",
    )
    catchup_window_seconds: int = Field(default=DEFAULT_WINDOW, ge=1, le=MAX_WINDOW)
    notify_url: str | None = Field(
        default=None,
        max_length=2000,
        description="Each fired task's final record is POSTed here, signed, as a submission's.",
    )
    # strict: a JSON boolean only. Lax mode would take 0, 0.0 or "no" as false, which the
    # published schema (type boolean) refuses.
    paused: bool = Field(default=False, strict=True)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        return _cron(value)

    @field_validator("notify_url")
    @classmethod
    def _check_notify_url(cls, value: str | None) -> str | None:
        return _notify_url(value)

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str | None) -> str | None:
        return _zone(value)


class ScheduleCreate(ScheduleFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "nightly-report",
                    "type": "process_data",
                    "payload": {"user_id": 42, "data": "report"},
                    "cron": "0 3 * * *",
                    "timezone": "Europe/Berlin",
                }
            ]
        },
    )

    type: str = Field(min_length=1, max_length=200, description="A registered task type.")
    name: str | None = Field(
        default=None, min_length=1, max_length=200, description="Unique per API key."
    )


class ScheduleUpdate(BaseModel):
    """A partial change: only the fields given change. To switch between cron and interval,
    give the new one and null for the other."""

    model_config = ConfigDict(extra="forbid")

    type: str | None = Field(default=None, min_length=1, max_length=200)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    payload: dict[str, Any] | None = None
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    priority: int | None = Field(default=None, ge=0, le=9)
    cron: str | None = Field(default=None, max_length=200)
    timezone: str | None = Field(default=None, max_length=64)
    interval_seconds: int | None = Field(default=None, ge=1, le=MAX_INTERVAL)
    overlap: Overlap | None = None
    catchup: Catchup | None = None
    catchup_window_seconds: int | None = Field(default=None, ge=1, le=MAX_WINDOW)
    notify_url: str | None = Field(default=None, max_length=2000)
    paused: bool | None = Field(default=None, strict=True)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, value: str | None) -> str | None:
        return _cron(value)

    @field_validator("notify_url")
    @classmethod
    def _check_notify_url(cls, value: str | None) -> str | None:
        return _notify_url(value)

    @field_validator("timezone")
    @classmethod
    def _check_zone(cls, value: str | None) -> str | None:
        return _zone(value)


class ScheduleRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    name: str | None
    source: str = Field(description="`api`, or `code` for one declared next to its task type.")
    type: str
    payload: dict[str, Any]
    queue: str | None
    priority: int
    cron: str | None
    timezone: str
    interval_seconds: int | None
    overlap: Overlap
    catchup: Catchup
    catchup_window_seconds: int
    notify_url: str | None
    paused: bool
    next_fire_at: datetime = Field(description="The next slot (while paused: when it was due).")
    last_slot_at: datetime | None = Field(description="The slot of the latest task fired.")
    last_task_id: uuid.UUID | None = Field(description="The latest task fired.")
    fired_count: int
    skipped_count: int = Field(
        description="Slots never fired: overlap, missed beyond the catch-up policy, or invalid."
    )
    created_at: datetime
    updated_at: datetime


class ScheduleList(BaseModel):
    items: list[ScheduleRead]
