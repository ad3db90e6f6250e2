"""What the API accepts and returns."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from app.tasks.states import TaskStatus

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
