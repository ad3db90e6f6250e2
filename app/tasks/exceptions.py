"""Errors of the tasks domain."""

from __future__ import annotations

from app.core.errors import AppError, Conflict, NotFound


class TaskNotFound(NotFound):
    code = "task_not_found"
    message = "task not found"


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"
    message = "this Idempotency-Key was used with a different request"


class TaskFinished(Conflict):
    code = "task_finished"
    message = "the task has already finished"


class QuotaExceeded(AppError):
    status_code = 429
    code = "quota_exceeded"
    message = "too many unfinished tasks for this API key"


class ResultTooLarge(ValueError):
    """A run's result over TASKDOCK_RESULT_MAX_BYTES: recorded as the task's error (FAILED, not
    retried), never an HTTP answer."""

    def __init__(self, *, size: int, limit: int) -> None:
        super().__init__(
            f"the result is {size:,} bytes of JSON; the limit is {limit:,} bytes "
            "(TASKDOCK_RESULT_MAX_BYTES): store large data elsewhere and return a reference"
        )
