"""What the API accepts and returns."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    computed_field,
    field_validator,
    model_validator,
)

from app.tasks.states import RunOutcome, TaskStatus
from app.webhooks.guard import url_problem

QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"
MAX_COUNTDOWN = 30 * 24 * 3600.0


class TaskCreate(BaseModel):
    """A submission. Unknown fields are refused, so nobody sets status, attempts or owner."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"type": "process_data", "payload": {"user_id": 42, "data": "hello"}}]
        },
    )

    type: str = Field(min_length=1, max_length=200, description="A registered task type.")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="Validated by the type's input model."
    )
    queue: str | None = Field(
        default=None, pattern=QUEUE_PATTERN, description="Overrides the type's queue."
    )
    priority: int = Field(default=0, ge=0, le=9, description="9 runs first.")
    countdown: float | None = Field(
        default=None, ge=0, le=MAX_COUNTDOWN, description="Seconds to wait before running."
    )
    eta: AwareDatetime | None = Field(
        default=None, description="Run at (or after) this time; needs a timezone."
    )
    notify_url: str | None = Field(
        default=None,
        max_length=2000,
        description="POSTed the final record, signed (Standard Webhooks); http or https, and a "
        "public address unless TASKDOCK_WEBHOOK_ALLOWED_NETWORKS allows it.",
    )

    @field_validator("notify_url")
    @classmethod
    def _notify_url_form(cls, value: str | None) -> str | None:
        # Its address is checked by the route (app.webhooks.guard): that needs a DNS lookup.
        if value is not None:
            url_problem(value)
        return value

    @model_validator(mode="after")
    def _one_schedule(self) -> TaskCreate:
        if self.countdown is not None and self.eta is not None:
            raise ValueError("give countdown or eta, not both")
        return self

    @field_validator("eta")
    @classmethod
    def _eta_in_range(cls, value: datetime | None) -> datetime | None:
        if value is not None and value - datetime.now(UTC) > timedelta(seconds=MAX_COUNTDOWN):
            raise ValueError("eta may be at most 30 days ahead")
        return value


class TaskError(BaseModel):
    type: str
    message: str
    traceback: str | None = Field(
        default=None, description="Left out of list items unless `include=result`."
    )


class TaskRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    type: str
    status: TaskStatus
    payload: dict[str, Any]
    queue: str
    priority: int
    attempt: int = Field(description="The current attempt, from 1.")
    max_attempts: int
    deliveries: int = Field(description="Times the current attempt was handed to a worker.")
    worker: str | None = Field(default=None, description="The worker process of the latest run.")
    result: Any | None = Field(
        default=None,
        description="What the task returned (its JSON at most TASKDOCK_RESULT_MAX_BYTES). "
        "Left out of list items unless `include=result`.",
    )
    error: TaskError | None = None
    idempotency_key: str | None = None
    run_after: datetime
    created_at: datetime
    updated_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    notify_url: str | None = Field(default=None, description="Where the final record is POSTed.")
    schedule_id: uuid.UUID | None = Field(
        default=None, description="The schedule that fired it (null once that is deleted)."
    )
    schedule_slot: datetime | None = Field(default=None, description="The slot it was fired for.")


class TaskPage(BaseModel):
    items: list[TaskRead]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class TaskTypeRead(BaseModel):
    name: str
    description: str
    queue: str
    max_attempts: int
    time_limit: float | None
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None


class TaskRunRead(BaseModel):
    """One run: one delivery of one attempt to a worker."""

    model_config = ConfigDict(from_attributes=True)

    attempt: int
    delivery: int = Field(description="Which hand-out of this attempt it was, from 1.")
    worker: str | None = Field(description="The worker process that ran it.")
    outcome: RunOutcome = Field(description="RUNNING until it ends.")
    error: TaskError | None = None
    started_at: datetime
    finished_at: datetime | None = None

    @computed_field(description="Seconds from start to end; null while it runs.")  # type: ignore[prop-decorator]
    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return round((self.finished_at - self.started_at).total_seconds(), 6)


class TaskRuns(BaseModel):
    task_id: uuid.UUID
    items: list[TaskRunRead] = Field(description="Every run of every attempt, oldest first.")


MAX_BULK = 10_000


class BulkAction(BaseModel):
    """Which tasks a bulk cancel or retry takes: every criterion given must hold."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"status": ["FAILED"], "type": "sleep", "limit": 100}]},
    )

    ids: list[uuid.UUID] | None = Field(
        default=None, min_length=1, max_length=MAX_BULK, description="These tasks only."
    )
    status: list[TaskStatus] | None = Field(
        default=None, min_length=1, description="Any of these states (of those the action takes)."
    )
    type: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[^\x00]*$")
    queue: str | None = Field(default=None, pattern=QUEUE_PATTERN)
    created_after: AwareDatetime | None = Field(default=None, description="Created at or after.")
    created_before: AwareDatetime | None = Field(default=None, description="Created before.")
    # Strict: a body saying "10" or 1 where a number or a boolean belongs is a mistake to name.
    limit: int = Field(
        ge=1, le=MAX_BULK, strict=True, description="At most this many tasks, oldest first."
    )
    dry_run: bool = Field(
        default=False, strict=True, description="Count the tasks it would take; change none."
    )

    @field_validator("created_after", "created_before", mode="before")
    @classmethod
    def _a_date_time_text(cls, value: object) -> object:
        # Pydantic would read a number as seconds since 1970: almost surely not what was meant.
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("give an ISO 8601 date-time with a time zone")
        return value

    @model_validator(mode="after")
    def _some_criterion(self) -> BulkAction:
        criteria = (self.ids, self.status, self.type, self.queue)
        if all(value is None for value in criteria) and not self.created_range:
            raise ValueError(
                "give at least one criterion (ids, status, type, queue, created_after, "
                "created_before): an empty filter would take every task"
            )
        if (
            self.created_after is not None
            and self.created_before is not None
            and self.created_after >= self.created_before
        ):
            raise ValueError("created_after must be before created_before")
        return self

    @property
    def created_range(self) -> bool:
        return self.created_after is not None or self.created_before is not None


BULK_IDS_SHOWN = 100


class BulkResult(BaseModel):
    matched: int = Field(description="Tasks that matched and were in a state the action takes.")
    changed: int = Field(description="Tasks changed; 0 in a dry run.")
    dry_run: bool
    ids: list[uuid.UUID] | None = Field(
        description=f"The tasks changed (matched, in a dry run), when at most {BULK_IDS_SHOWN}."
    )
