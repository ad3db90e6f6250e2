"""Ring the doorbell: tell the broker that a committed record is ready, by id and attempt.

Every message runs the one job `taskdock.execute` with the keyword arguments task_id and
attempt; Celery's `shadow` names it after the task type in logs, events and `celery inspect`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from celery import Celery

from app.core.celery import JOB_NAME
from app.core.config import get_settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Doorbell:
    """What the broker carries: never the payload, only where to find it."""

    task_id: uuid.UUID
    attempt: int
    type: str
    queue: str
    priority: int
    time_limit: float | None
    request_id: str | None = None


def message_id(task_id: uuid.UUID, attempt: int) -> str:
    """One Celery id per attempt, so revoking an attempt never blocks a later retry."""
    return f"{task_id}.{attempt}"


def send(app: Celery, bell: Doorbell, *, connection: Any = None) -> None:
    """Publish one message, without Celery's own retry loop (it can stall for seconds)."""
    options: dict[str, Any] = {}
    if bell.time_limit:
        options["soft_time_limit"] = bell.time_limit
        options["time_limit"] = bell.time_limit + get_settings().task_hard_limit_grace
    broker = app.conf.broker_url.split("://", 1)[0]
    # Redis sorts priority 0 first, RabbitMQ 9 first; the API speaks RabbitMQ's language.
    priority = 9 - bell.priority if broker.startswith("redis") else bell.priority
    task_id = str(bell.task_id)
    app.send_task(
        JOB_NAME,
        kwargs={"task_id": task_id, "attempt": bell.attempt},
        queue=bell.queue,
        priority=priority,
        task_id=message_id(bell.task_id, bell.attempt),
        retry=False,
        connection=connection,
        headers={"taskdock_type": bell.type, "taskdock_request_id": bell.request_id},
        # What Flower, `celery inspect` and `celery events` show: the task type's name and the
        # taskdock id. Given here, Celery does not build them with its (slower) saferepr.
        shadow=bell.type,
        argsrepr="()",
        kwargsrepr=f"{{'task_id': '{task_id}', 'attempt': {bell.attempt}}}",
        **options,
    )


class Publisher:
    """A bounded publish for the request path: it never blocks longer than `timeout`.

    After a failure it stays quiet for a few seconds, so a dead broker costs the API
    nothing; the dispatcher publishes what was skipped.
    """

    def __init__(self, app: Celery, *, timeout: float, quiet_seconds: float = 5.0) -> None:
        self.app = app
        self.timeout = timeout
        self.quiet_seconds = quiet_seconds
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="publish")
        self._quiet_until = 0.0
        self._lock = threading.Lock()

    @property
    def quiet(self) -> bool:
        """True while a recent failure says the broker is away: do not even try."""
        return time.monotonic() < self._quiet_until

    async def publish(self, bell: Doorbell) -> bool:
        """Send one message from the event loop; False if it was not sent within `timeout`."""
        if self.quiet:
            return False
        future = asyncio.wrap_future(self._executor.submit(send, self.app, bell))
        try:
            await asyncio.wait_for(future, timeout=self.timeout)
        except TimeoutError:
            self._quiet(f"publish took over {self.timeout}s")
            return False
        except Exception as exc:  # kombu raises several families; every one means "not sent"
            self._quiet(f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _quiet(self, reason: str) -> None:
        with self._lock:
            self._quiet_until = time.monotonic() + self.quiet_seconds
        logger.warning(
            "broker publish failed; the dispatcher will publish", extra={"reason": reason}
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def queue_depths(app: Celery, queues: list[str], *, timeout: int = 1) -> dict[str, int]:
    """Messages ready in each broker queue (not those a worker holds unacknowledged).

    Raises when the broker does not answer within `timeout`; a queue the broker does not know
    (never declared, or on Redis emptied and so deleted) holds 0.
    """
    depths: dict[str, int] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0, timeout=timeout)
        channel: Any = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True)[1])
            except connection.channel_errors:
                depths[queue] = 0
                channel = connection.channel()
    return depths
