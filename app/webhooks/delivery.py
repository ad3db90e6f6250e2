"""The webhook sender: the dispatcher's thread that owes every final task's record to its URL.

Each round (bounded: `batch` tasks and `batch` deliveries, every POST within the timeout):
1. `enqueue_final`: final tasks with a notify_url and no delivery yet get one (its body made
   and stored then, so every retry sends the same bytes under the same `webhook-id`), and
   `notified_at`, in the same transaction. The worker's writes are untouched: the sender
   finds the tasks (the partial index ix_task_notify holds only those owed).
2. `claim_due`: pending deliveries that are due are taken (FOR UPDATE SKIP LOCKED on
   PostgreSQL, so two dispatchers never send one at once) and pushed `LEASE` seconds ahead
   before any POST: a sender that dies mid-POST leaves the delivery to be tried again then.
3. Each is POSTed (`post`), to the address the guard checked just now, and its outcome
   recorded (`record`): delivered on a 2xx; otherwise tried again after an exponential
   backoff with jitter, until TASKDOCK_WEBHOOK_RETRY_WINDOW_SECONDS after its creation, then
   failed. At least once: a receiver may see a delivery twice, and dedupes on `webhook-id`.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks.models import Task
from app.tasks.schemas import TaskRead
from app.tasks.states import TERMINAL
from app.webhooks import guard, signing
from app.webhooks.models import ERROR_BYTES, DeliveryStatus, WebhookDelivery
from app.webhooks.service import message_id

logger = logging.getLogger(__name__)

BACKOFF_BASE = 1.0
BACKOFF_MAX = 3600.0
# How much of a receiver's answer is kept (in last_error): enough to tell what it said.
BODY_BYTES = 200
USER_AGENT = "taskdock-webhooks"


def lease_seconds(settings: Settings) -> float:
    """How long a claimed delivery is left alone: its POST's connect and read, and a margin."""
    return 2 * settings.webhook_timeout_seconds + 30.0


def body_of(task: Task) -> dict[str, Any]:
    """The webhook's body: the record as GET /api/v1/tasks/{id} returns it, and its type."""
    record = TaskRead.model_validate(task).model_dump(mode="json")
    return {
        "type": f"task.{task.status.value.lower()}",
        "timestamp": utcnow().isoformat(),
        "data": record,
    }


def enqueue_final(*, session: Session, limit: int, lock: bool) -> int:
    """A delivery for each final task owed one (at most `limit`); returns how many."""
    query = (
        select(Task)
        .where(
            Task.notify_url.is_not(None),
            Task.notified_at.is_(None),
            Task.status.in_(sorted(TERMINAL)),
        )
        .order_by(Task.finished_at)
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    tasks = list(session.scalars(query))
    if not tasks:
        return 0
    now = utcnow()
    for task in tasks:
        assert task.notify_url is not None
        session.add(
            WebhookDelivery(
                id=uuid.uuid4(),
                task_id=task.id,
                attempt=task.attempt,
                url=task.notify_url,
                payload=body_of(task),
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
    session.execute(
        update(Task)
        .where(Task.id.in_([task.id for task in tasks]))
        # updated_at kept: being notified is not a change of the task.
        .values(notified_at=now, updated_at=Task.updated_at)
        .execution_options(synchronize_session=False)
    )
    return len(tasks)


@dataclass(frozen=True)
class Claimed:
    id: uuid.UUID
    url: str
    payload: dict[str, Any]
    owner: str
    created_at: datetime
    attempts: int  # this one included


def claim_due(*, session: Session, limit: int, lock: bool, lease: float) -> list[Claimed]:
    """Due pending deliveries, each counted as tried and left alone for `lease` seconds."""
    now = utcnow()
    query = (
        select(WebhookDelivery, Task.owner)
        .join(Task, Task.id == WebhookDelivery.task_id)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
    claimed = []
    for delivery, owner in session.execute(query).tuples():
        delivery.attempts += 1
        delivery.next_attempt_at = now + timedelta(seconds=lease)
        claimed.append(
            Claimed(
                delivery.id,
                delivery.url,
                delivery.payload,
                owner,
                delivery.created_at,
                delivery.attempts,
            )
        )
    return claimed


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None = None
    error: str | None = None


def post(
    client: httpx.Client, claimed: Claimed, *, settings: Settings, now: datetime | None = None
) -> Outcome:
    """One signed POST of a delivery, to the address the guard allows right now."""
    try:
        target = guard.resolve(claimed.url, guard.networks(settings.webhook_allowed_networks))
        secret = signing.secret_for(owner=claimed.owner, settings=settings)
    except (guard.UnsafeUrl, signing.WebhooksOff) as exc:
        return Outcome(delivered=False, error=f"refused: {exc}")
    return send_to(client, target, claimed, secret=secret, now=now)


def send_to(
    client: httpx.Client,
    target: guard.Target,
    claimed: Claimed,
    *,
    secret: str,
    now: datetime | None = None,
) -> Outcome:
    """POST a delivery, signed with `secret`, to the checked `target` and no other address."""
    body = json.dumps(claimed.payload, separators=(",", ":"), ensure_ascii=False)
    msg_id = message_id(claimed.id)
    stamp = (now or datetime.now(UTC)).replace(microsecond=0)
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(stamp.timestamp())),
        "webhook-signature": signing.signature(
            secret=secret, message_id=msg_id, timestamp=stamp, body=body
        ),
    }
    url, extensions = pinned(claimed.url, target)
    headers["host"] = _host_header(target)
    try:
        request = client.build_request(
            "POST", url, content=body.encode(), headers=headers, extensions=extensions
        )
        response = client.send(request, stream=True)
        try:
            # Only the first bytes of the answer are read; the rest is never stored.
            head = b""
            for chunk in response.iter_raw():
                head += chunk
                if len(head) >= BODY_BYTES:
                    break
        finally:
            response.close()
    except httpx.HTTPError as exc:
        return Outcome(delivered=False, error=f"{type(exc).__name__}: {exc}")
    if response.is_success:
        return Outcome(delivered=True, status_code=response.status_code)
    said = head[:BODY_BYTES].decode("utf-8", "replace")
    reason = "redirects are not followed" if response.is_redirect else said
    error = f"HTTP {response.status_code}: {reason}"
    return Outcome(delivered=False, status_code=response.status_code, error=error)


def pinned(url: str, target: guard.Target) -> tuple[httpx.URL, dict[str, Any]]:
    """`url` aimed at the checked address, so no second lookup can lead elsewhere; TLS still
    names (and verifies) the host."""
    address = str(target.address)
    host = f"[{address}]" if ":" in address else address
    aimed = httpx.URL(url).copy_with(host=host.strip("[]"), port=target.port)
    extensions: dict[str, Any] = {}
    if target.scheme == "https":
        extensions["sni_hostname"] = target.host
    return aimed, extensions


def _host_header(target: guard.Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    if target.port == guard.SCHEMES[target.scheme]:
        return host
    return f"{host}:{target.port}"


def backoff(attempts: int) -> float:
    """Seconds before the next try: doubling from BACKOFF_BASE, at most BACKOFF_MAX, with
    jitter, so the retries of many deliveries to one receiver spread out."""
    delay: float = min(BACKOFF_BASE * 2.0 ** max(attempts - 1, 0), BACKOFF_MAX)
    return delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret


def record(
    *, session: Session, claimed: Claimed, outcome: Outcome, window: float
) -> DeliveryStatus:
    """Write an attempt's outcome; returns the delivery's status after it."""
    now = utcnow()
    error = _clip(outcome.error)
    values: dict[str, Any] = {"last_status_code": outcome.status_code, "last_error": error}
    if outcome.delivered:
        status = DeliveryStatus.DELIVERED
        values.update(status=status, delivered_at=now, last_error=None)
    else:
        deadline = claimed.created_at + timedelta(seconds=window)
        if now >= deadline:
            status = DeliveryStatus.FAILED
            values.update(status=status)
        else:
            status = DeliveryStatus.PENDING
            retry_at = now + timedelta(seconds=backoff(claimed.attempts))
            values.update(next_attempt_at=min(retry_at, deadline))
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == claimed.id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return status


def _clip(text: str | None) -> str | None:
    """At most ERROR_BYTES bytes of UTF-8, cut on a character boundary."""
    if text is None:
        return None
    return text.encode()[:ERROR_BYTES].decode("utf-8", "ignore")


class WebhookSender:
    """Runs the rounds above in a thread of its own, so a slow receiver never holds up the
    dispatcher's outbox."""

    def __init__(
        self, *, settings: Settings, lock: bool, stop: threading.Event, batch: int = 50
    ) -> None:
        self.settings = settings
        self.lock = lock
        self.stop = stop
        self.batch = batch
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook")
        timeout = settings.webhook_timeout_seconds
        # No proxies from the environment: a proxy would make its own lookup of the name.
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=timeout),
            follow_redirects=False,
            trust_env=False,
        )

    def start(self) -> None:
        """Run rounds in a daemon thread until `stop` is set; a POST cut short by the
        process's exit is tried again once its lease runs out."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="webhook-sender", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                busy = self.round()
            except Exception:
                logger.warning("webhook round failed", exc_info=True)
                busy = 0
            if busy < self.batch:
                self.stop.wait(self.settings.dispatcher_interval)
        self.client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def round(self) -> int:
        """Enqueue what newly ended, send what is due; returns how many deliveries were sent."""
        with session_scope() as session:
            enqueue_final(session=session, limit=self.batch, lock=self.lock)
        with session_scope() as session:
            due = claim_due(
                session=session,
                limit=self.batch,
                lock=self.lock,
                lease=lease_seconds(self.settings),
            )
        if not due:
            return 0
        outcomes = list(self._pool.map(self._post, due))
        for claimed, outcome in zip(due, outcomes, strict=True):
            self._record(claimed, outcome)
        return len(due)

    def _post(self, claimed: Claimed) -> Outcome:
        try:
            return post(self.client, claimed, settings=self.settings)
        except Exception as exc:  # a receiver must never stop the sender
            logger.warning("webhook post failed", exc_info=True)
            return Outcome(delivered=False, error=f"{type(exc).__name__}: {exc}")

    def _record(self, claimed: Claimed, outcome: Outcome) -> None:
        with session_scope() as session:
            status = record(
                session=session,
                claimed=claimed,
                outcome=outcome,
                window=self.settings.webhook_retry_window_seconds,
            )
        label = "retrying" if status is DeliveryStatus.PENDING else status.value
        logger.info(
            "webhook attempt",
            extra={
                "delivery": str(claimed.id),
                "outcome": label,
                "status_code": outcome.status_code,
                "attempt": claimed.attempts,
            },
        )
