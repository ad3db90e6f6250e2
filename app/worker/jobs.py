"""The Celery side: one job that runs any task type by id. Never pass records to it.

The record is the truth; Celery's state follows it, so Flower and `celery events` read right.
The message is published under the task type's name (Celery's `shadow`, see the publisher), and
the job ends as the record did: SUCCEEDED is SUCCESS, FAILED is FAILURE with the error, a failed
attempt that will run again is RETRY. A stale or lost delivery is SUCCESS with the result "stale"
or "lost": Celery delivered it and nothing more is to be done (Celery's IGNORED sends no event, so
Flower would show it as started for ever). Either way the message is acknowledged and nothing is
published again: the record and the dispatcher own every retry.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import timedelta
from typing import Any

from celery import shared_task
from celery.exceptions import Reject, Retry
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.celery import JOB_NAME, app_settings
from app.core.logging import log_context
from app.db.base import utcnow
from app.worker import runner
from app.worker.runner import Ended, Outcome

logger = logging.getLogger(__name__)
REQUEUE_PAUSE = 2.0


class TaskFailed(Exception):
    """The run failed and the record says so; the message is "ErrorType: message"."""


# `throws`: Celery logs a TaskFailed in one line at INFO, with no traceback, like any expected
# error; the runner has already logged the failure once, with its type and the task's context.
@shared_task(
    name=JOB_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, throws=(TaskFailed,)
)
def execute(self: Any, task_id: str, attempt: int) -> str:
    """Re-read the record by id and run this attempt; the record decides, not the message."""
    context = {"task_id": task_id, "attempt": attempt}
    request_id = getattr(self.request, "taskdock_request_id", None)
    if request_id:
        context["request_id"] = request_id
    token = log_context.set(context)
    try:
        ended = runner.execute(
            task_id=uuid.UUID(task_id),
            attempt=int(attempt),
            worker=str(self.request.hostname or "worker"),
            settings=app_settings(self.app),
        )
    except (OperationalError, InterfaceError) as exc:
        # The database is away. Acking would leave the record waiting for the lost-message
        # sweep; hand the message back instead, after a pause so it does not spin.
        logger.warning("database unavailable; message requeued", extra={"reason": str(exc)[:200]})
        time.sleep(REQUEUE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    finally:
        log_context.reset(token)
    return celery_state(ended)


def celery_state(ended: Ended) -> str:
    """Return the result of a run that Celery should call SUCCESS; raise for FAILURE or RETRY.

    Raised after the record is written, these only tell Celery what happened: a FAILURE is
    acknowledged (task_acks_on_failure_or_timeout), and a bare Retry, unlike `task.retry()`,
    publishes nothing; the worker acknowledges it too.
    """
    if ended.outcome is Outcome.FAILED:
        raise TaskFailed(describe(ended.error)) from ended.cause
    if ended.outcome is Outcome.RETRYING:
        # The retry's reason is a TaskFailed too: the error's own class may not survive the
        # pickling between a pool process and the worker.
        when = utcnow() + timedelta(seconds=ended.retry_in or 0)  # the record's run_after
        raise Retry(exc=TaskFailed(describe(ended.error)), when=when) from ended.cause
    return ended.outcome.value


def describe(error: dict[str, Any] | None) -> str:
    if not error:
        return "failed"
    message = str(error.get("message") or "")
    return f"{error.get('type', 'Error')}: {message}" if message else str(error.get("type"))
