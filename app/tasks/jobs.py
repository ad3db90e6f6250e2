"""The Celery side: one job that runs any task type by id. Never pass records to it."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from celery import shared_task
from celery.exceptions import Reject
from sqlalchemy.exc import InterfaceError, OperationalError

from app.core.celery import JOB_NAME
from app.core.config import get_settings
from app.core.logging import log_context
from app.tasks import runner

logger = logging.getLogger(__name__)
REQUEUE_PAUSE = 2.0


@shared_task(name=JOB_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
def execute(self: Any, task_id: str, attempt: int) -> str:
    """Re-read the record by id and run this attempt; the record decides, not the message."""
    context = {"task_id": task_id, "attempt": attempt}
    request_id = getattr(self.request, "taskdock_request_id", None)
    if request_id:
        context["request_id"] = request_id
    token = log_context.set(context)
    try:
        outcome = runner.execute(
            task_id=uuid.UUID(task_id),
            attempt=int(attempt),
            worker=str(self.request.hostname or "worker"),
            settings=get_settings(),
        )
        return outcome.value
    except (OperationalError, InterfaceError) as exc:
        # The database is away. Acking would leave the record waiting for the lost-message
        # sweep; hand the message back instead, after a pause so it does not spin.
        logger.warning("database unavailable; message requeued", extra={"reason": str(exc)[:200]})
        time.sleep(REQUEUE_PAUSE)
        raise Reject(exc, requeue=True) from exc
    finally:
        log_context.reset(token)
