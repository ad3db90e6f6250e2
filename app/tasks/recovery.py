"""Recovery: how a task whose run or message was lost still finishes. Read this first.

A task can be lost in three places after its commit, and each has one owner:

1. **Its message never left.** The API committed and died (or the broker refused) before the
   publish: the row is in the outbox, `published_at` null. The dispatcher sends it
   (`app.tasks.publication.publish_outbox`); publication's map tells the rest.
2. **Its message left and the broker lost it** (a flushed or restarted Redis). `Recovery`
   compares each queue's depth with the waiting rows that should have a message there and hands
   back the shortfall, and only that (`forget_lost_publications`): a backlog waiting for a
   worker holds every message, so it never grows the queue.
3. **Its run died** (the worker was killed, or Celery's hard time limit killed the run). A
   running row holds a lease its worker renews; once the lease has run out, the reaper
   (`reap_expired_leases`) hands the attempt out again, or ends it: FAILED `TimeLimitExceeded`
   when the run reached its hard limit, FAILED `WorkerLost` when every one of
   TASKDOCK_TASK_MAX_DELIVERIES runs died (`lost_too_often`, the one poison rule, which the
   worker's claim applies too). Either way the run's row in the run history ends LOST.

A run's own writes (claim, lease renewal, outcome), fenced by (attempt, delivery) so that a
stale run or a late redelivery changes nothing, are `app.tasks.lifecycle`'s. The dispatcher
process (`app.tasks.dispatcher`) runs `Recovery.sweep` every TASKDOCK_REAPER_INTERVAL seconds
and the lost-message comparison every third of TASKDOCK_REPUBLISH_AFTER_SECONDS.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks.lifecycle import end_runs, rowcount
from app.tasks.models import FORGET_DEAD_LISTENERS, Task
from app.tasks.publication import queue_depths
from app.tasks.registry import time_limits
from app.tasks.states import WAITING, RunOutcome, TaskStatus

logger = logging.getLogger(__name__)

# pg_try_advisory_xact_lock's key for the lost-message sweep; any constant, the same everywhere.
LOST_SWEEP_LOCK = 0x7A5D0C4C


@dataclass
class Swept:
    requeued: int = 0
    failed: int = 0
    republished: int = 0
    errors: list[str] = field(default_factory=list)


class Recovery:
    """The dispatcher's sweeps: expired leases every time, lost messages less often."""

    def __init__(self, *, settings: Settings, celery_app: Celery, lock: bool) -> None:
        self.settings = settings
        self.celery_app = celery_app
        # On PostgreSQL several dispatchers may run: the lost-message sweep takes a lock.
        self.lock = lock
        self._last_lost_sweep = 0.0

    def sweep(self) -> Swept:
        swept = Swept()
        try:
            with session_scope() as session:
                reaped = reap_expired_leases(
                    session=session,
                    max_deliveries=self.settings.task_max_deliveries,
                    hard_limit=self.hard_limit,
                )
                swept.requeued = reaped.requeued
                swept.failed = reaped.worker_lost + reaped.timed_out
                if self.lock:
                    # An API process killed while it listened leaves its row: without this,
                    # every status change would go on paying a notification for nobody.
                    session.execute(text(FORGET_DEAD_LISTENERS))
        except Exception as exc:
            swept.errors.append(f"sweep: {exc}")
            logger.warning("lease sweep failed", exc_info=True)
            return swept
        if swept.requeued or swept.failed:
            logger.warning(
                "expired leases reaped", extra={"requeued": swept.requeued, "failed": swept.failed}
            )
        # It counts every waiting row and asks the broker about each queue: not every sweep.
        now = time.monotonic()
        if now - self._last_lost_sweep >= self.settings.republish_after_seconds / 3:
            self._last_lost_sweep = now
            self._recover_lost_messages(swept)
        return swept

    def _recover_lost_messages(self, swept: Swept) -> None:
        """Publish again what the broker lost (a flushed or restarted Redis), and only that."""
        try:
            with session_scope() as session:
                # Several dispatchers would each see the same shortfall: one sweeps at a time.
                if self.lock and not session.scalar(
                    text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": LOST_SWEEP_LOCK}
                ):
                    return
                swept.republished = forget_lost_publications(
                    session=session,
                    older_than=self.settings.republish_after_seconds,
                    held=lambda queues: queue_depths(self.celery_app, queues),
                )
        except Exception as exc:
            # Without the broker's count nothing is sent again: the outbox keeps the rows.
            swept.errors.append(f"lost-message sweep: {exc}")
            logger.warning("lost-message sweep skipped", extra={"reason": str(exc)[:200]})
            return
        if swept.republished:
            logger.warning(
                "messages missing from the broker; publishing again",
                extra={"count": swept.republished},
            )

    def hard_limit(self, type_: str) -> float:
        """Seconds after which Celery has killed a run of this type."""
        return time_limits(type_, settings=self.settings).hard


@dataclass
class Reaped:
    requeued: int = 0
    worker_lost: int = 0
    timed_out: int = 0


def reap_expired_leases(
    *, session: Session, max_deliveries: int, hard_limit: Callable[[str], float], batch: int = 500
) -> Reaped:
    """RUNNING rows whose lease ran out: their run is gone (its worker died, or Celery's hard
    time limit killed it). Hand them out again, or end them as FAILED; either way their run
    is over, and its row in the run history says LOST, with why."""
    now = utcnow()
    rows = session.execute(
        select(Task.id, Task.type, Task.attempt, Task.deliveries, Task.started_at)
        .where(Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now)
        .limit(batch)
    ).all()
    reaped = Reaped()
    for row in rows:
        values: dict[str, Any]
        ran = (now - row.started_at).total_seconds() if row.started_at else 0.0
        if ran >= hard_limit(row.type):
            # No run outlives its hard limit: this one was killed for it. Retrying would
            # most likely be killed again, so it ends here.
            values = _failed(now, "TimeLimitExceeded", f"killed after its {ran:.0f}s time limit")
            reaped.timed_out += 1
        elif lost_too_often(row.deliveries, max_deliveries=max_deliveries):
            values = _failed(now, "WorkerLost", worker_lost(row.deliveries))
            reaped.worker_lost += 1
        else:
            values = {"status": TaskStatus.QUEUED, "published_at": None}
            reaped.requeued += 1
        changed = session.execute(
            update(Task)
            .where(
                Task.id == row.id,
                Task.attempt == row.attempt,
                Task.deliveries == row.deliveries,
                Task.status == TaskStatus.RUNNING,
                Task.lease_expires_at < now,
            )
            .values(lease_expires_at=None, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
        if rowcount(changed) == 1:
            # Not the hot path: a second statement of the sweep's transaction.
            end_runs(
                session=session,
                attempts=[(row.id, row.attempt)],
                outcome=RunOutcome.LOST,
                error=values.get("error", LEASE_RAN_OUT),
            )
    return reaped


LEASE_RAN_OUT = {
    "type": "WorkerLost",
    "message": "the run's lease ran out (its worker was lost); the attempt is handed out again",
}


def lost_too_often(lost_runs: int, *, max_deliveries: int) -> bool:
    """Poison: every one of `max_deliveries` runs of this attempt died with its worker.

    The one test of it, for the reaper (a lease ran out on the last run) and for a worker that
    is handed the attempt once more (its claim counts the lost runs before it)."""
    return lost_runs >= max_deliveries


def worker_lost(lost_runs: int) -> str:
    return f"the worker was lost {lost_runs} times running this attempt"


def _failed(now: datetime, kind: str, message: str) -> dict[str, Any]:
    return {
        "status": TaskStatus.FAILED,
        "error": {"type": kind, "message": message},
        "finished_at": now,
    }


def forget_lost_publications(
    *, session: Session, older_than: float, held: Callable[[list[str]], Mapping[str, int]]
) -> int:
    """Hand back to the outbox the waiting rows whose message the broker no longer holds.

    A published, waiting row should have one message in its queue. `held(queues)` says how
    many each queue holds, read after the record: a message published in between can only hide
    a loss until the next sweep, never cause a duplicate. Where a queue holds fewer than the
    record expects, the shortfall (and no more) of rows published over `older_than` seconds
    ago, oldest publication first, is published again. A queue that merely waits for a worker
    holds every message, and nothing is sent twice: a backlog never grows the broker's queue.
    Which rows lost their message cannot be told, so one still held may be sent again (the
    duplicate finds the task taken); the one really lost comes up in a later sweep, since each
    republished row moves to the back. Messages a worker holds unacknowledged count as missing:
    at most a few duplicates.
    """
    now = utcnow()
    waiting = sorted(WAITING)
    expected = session.execute(
        select(Task.queue, func.count())
        .where(Task.status.in_(waiting), Task.published_at.is_not(None))
        .group_by(Task.queue)
    ).all()
    if not expected:
        return 0
    depths = held(sorted(queue for queue, _ in expected))
    cutoff = now - timedelta(seconds=older_than)
    forgotten = 0
    for queue, count in expected:
        missing = int(count) - depths.get(queue, 0)
        if missing <= 0:
            continue
        oldest = (
            select(Task.id)
            .where(Task.status.in_(waiting), Task.queue == queue, Task.published_at < cutoff)
            .order_by(Task.published_at)
            .limit(missing)
        )
        result = session.execute(
            update(Task)
            .where(Task.id.in_(oldest), Task.status.in_(waiting))
            .values(published_at=None)
            .execution_options(synchronize_session=False)
        )
        forgotten += rowcount(result)
    return forgotten
