"""The worker's and the dispatcher's side of the record: claim, lease, finish, reap.

Every write is a conditional UPDATE fenced by (attempt, delivery): a stale run, a late
redelivery or a cancelled task changes nothing.

Durability, on PostgreSQL: the worker's connections commit without waiting for the WAL flush
(app.core.db), so a database crash may forget a claim or a lease renewal. That costs nothing:
the run's later writes accept a row whose claim was forgotten (waiting, one delivery short) as
theirs and put the claim back. A run's outcome is different: the broker's message is
acknowledged right after it, and an outcome forgotten then would leave the task waiting for the
lost-message sweep. So the outcome writes alone wait for the flush (`_durable`), in the same
round trip.
"""

from __future__ import annotations

import traceback as tb
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Integer,
    Table,
    Update,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from app.core.db import DirectConnection
from app.db.base import UTCDateTime, utcnow
from app.tasks.models import Task
from app.tasks.states import WAITING, TaskStatus, sources

# A run's writes take an ORM Session, a Core Connection or, on the worker's hot path on
# PostgreSQL, the process's DirectConnection (app.core.db.statement_scope).
Executor = Session | Connection | DirectConnection

TRACEBACK_LIMIT = 4000
MESSAGE_LIMIT = 1000


@dataclass(frozen=True)
class Claim:
    """A run of one attempt: the fence every later write of this run must pass."""

    task_id: uuid.UUID
    attempt: int
    delivery: int
    type: str
    payload: dict[str, Any]
    max_attempts: int
    run_after: datetime


def error_record(exc: BaseException, *, with_traceback: bool = True) -> dict[str, Any]:
    record: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)[:MESSAGE_LIMIT]}
    if with_traceback:
        record["traceback"] = "".join(tb.format_exception(exc))[-TRACEBACK_LIMIT:]
    return record


def rowcount(result: Any) -> int:
    """Rows an UPDATE changed: how a fenced write tells whether it won."""
    return int(result.rowcount)


# The two writes of every run, built once with bound parameters against the table: building
# an ORM UPDATE per call, and its cache key, cost more of a worker's CPU than executing it.
_table = cast(Table, Task.__table__)
_c = _table.c


def _status_is(states: Iterable[TaskStatus]) -> list[Any]:
    # Equalities, not IN: an IN list's parameters are expanded per execution, and these
    # statements are compiled once for the worker's DirectConnection.
    return [_c.status == state.value for state in sorted(states)]


_now = bindparam("b_now", type_=UTCDateTime())
_this_attempt = and_(
    _c.id == bindparam("b_id", type_=_c.id.type), _c.attempt == bindparam("b_attempt")
)
_CLAIM = (
    update(_table)
    # No run_after check: messages are sent only when due, and a worker whose clock runs a
    # little behind the publisher's must not refuse them.
    .where(
        _this_attempt,
        or_(
            *_status_is(sources(TaskStatus.RUNNING) - {TaskStatus.RUNNING}),
            # Redelivered after its worker vanished: only once that worker's lease ran out.
            and_(_c.status == TaskStatus.RUNNING.value, _c.lease_expires_at < _now),
        ),
    )
    .values(
        status=TaskStatus.RUNNING.value,
        deliveries=_c.deliveries + 1,
        lease_expires_at=bindparam("b_lease", type_=UTCDateTime()),
        worker=bindparam("b_worker"),
        started_at=_now,
        updated_at=_now,
    )
    .returning(_c.deliveries, _c.type, _c.payload, _c.max_attempts, _c.run_after)
)
_delivery = bindparam("b_delivery", type_=Integer())
# This run's row: claimed by it, or still waiting where a database crash forgot the claim.
_ours = or_(
    and_(_c.status == TaskStatus.RUNNING.value, _c.deliveries == _delivery),
    and_(or_(*_status_is(WAITING)), _c.deliveries == _delivery - 1),
)
# PostgreSQL: this transaction's commit waits for the WAL flush, whatever the connection's
# synchronous_commit. Set by the statement itself, so it costs no round trip; the EXISTS makes
# PostgreSQL evaluate it before it writes any row.
_DURABLE = select(func.set_config("synchronous_commit", "on", true()).label("on")).cte("durable")


def _durable(statement: Update) -> Update:
    return statement.add_cte(_DURABLE).where(exists(select(_DURABLE.c.on)))


def _for_dialect(statement: Update) -> dict[str, Update]:
    return {"postgresql": _durable(statement), "sqlite": statement}


_SUCCEED = _for_dialect(
    update(_table)
    .where(_this_attempt, _ours)
    .values(
        status=TaskStatus.SUCCEEDED.value,
        deliveries=_delivery,
        result=bindparam("b_result", type_=_c.result.type),
        error=None,
        finished_at=_now,
        updated_at=_now,
        lease_expires_at=None,
    )
)
# Extends the lease, and puts back a claim the database forgot.
_RENEW = (
    update(_table)
    .where(_this_attempt, _ours)
    .values(
        status=TaskStatus.RUNNING.value,
        deliveries=_delivery,
        lease_expires_at=bindparam("b_lease", type_=UTCDateTime()),
        updated_at=_now,
    )
)


def claim(
    *, session: Executor, task_id: uuid.UUID, attempt: int, worker: str, lease_seconds: float
) -> Claim | None:
    """Take the task for this run, or None when the message is stale or the task is held."""
    now = utcnow()
    row = session.execute(
        _CLAIM,
        {
            "b_id": task_id,
            "b_attempt": attempt,
            "b_now": now,
            "b_lease": now + timedelta(seconds=lease_seconds),
            "b_worker": worker[:255],
        },
    ).one_or_none()
    if row is None:
        return None
    return Claim(
        task_id=task_id,
        attempt=attempt,
        delivery=row.deliveries,
        type=row.type,
        payload=row.payload,
        max_attempts=row.max_attempts,
        run_after=row.run_after,
    )


def _fence(claim: Claim) -> dict[str, Any]:
    return {"b_id": claim.task_id, "b_attempt": claim.attempt, "b_delivery": claim.delivery}


def renew_lease(*, session: Executor, claim: Claim, lease_seconds: float) -> bool:
    """Extend this run's lease; False means the run lost the task (cancelled or reaped)."""
    now = utcnow()
    result = session.execute(
        _RENEW, {**_fence(claim), "b_now": now, "b_lease": now + timedelta(seconds=lease_seconds)}
    )
    return rowcount(result) == 1


def succeed(*, session: Executor, claim: Claim, result: Any) -> bool:
    outcome = session.execute(
        _SUCCEED[_dialect(session)], {**_fence(claim), "b_result": result, "b_now": utcnow()}
    )
    return rowcount(outcome) == 1


def _dialect(session: Executor) -> str:
    bind = session.get_bind() if isinstance(session, Session) else session
    return str(bind.dialect.name)


_error = bindparam("b_error", type_=_c.error.type)
# A failed run with a retry left: the next attempt waits in the outbox for its backoff.
_RETRY = _for_dialect(
    update(_table)
    .where(_this_attempt, _ours)
    .values(
        status=TaskStatus.RETRYING.value,
        attempt=_c.attempt + 1,
        deliveries=0,
        run_after=bindparam("b_run_after", type_=UTCDateTime()),
        published_at=None,
        queued_at=None,
        error=_error,
        updated_at=_now,
        lease_expires_at=None,
    )
)
_FAIL = _for_dialect(
    update(_table)
    .where(_this_attempt, _ours)
    .values(
        status=TaskStatus.FAILED.value,
        deliveries=_delivery,
        error=_error,
        finished_at=_now,
        updated_at=_now,
        lease_expires_at=None,
    )
)


def fail(
    *, session: Executor, claim: Claim, error: dict[str, Any], retry_in: float | None
) -> TaskStatus | None:
    """Record a failed run: RETRYING with a backoff, or FAILED. None if the run was stale."""
    now = utcnow()
    parameters = {**_fence(claim), "b_error": error, "b_now": now}
    if retry_in is not None and claim.attempt < claim.max_attempts:
        statement, target = _RETRY, TaskStatus.RETRYING
        parameters["b_run_after"] = now + timedelta(seconds=retry_in)
    else:
        statement, target = _FAIL, TaskStatus.FAILED
    outcome = session.execute(statement[_dialect(session)], parameters)
    return target if rowcount(outcome) == 1 else None


def give_up(*, session: Executor, claim: Claim, reason: str) -> bool:
    """End a poison task: it was handed out too often without ever finishing."""
    return (
        fail(
            session=session,
            claim=claim,
            error={"type": "WorkerLost", "message": reason},
            retry_in=None,
        )
        is TaskStatus.FAILED
    )


@dataclass
class Reaped:
    requeued: int = 0
    worker_lost: int = 0
    timed_out: int = 0


def reap_expired_leases(
    *, session: Session, max_deliveries: int, hard_limit: Callable[[str], float], batch: int = 500
) -> Reaped:
    """RUNNING rows whose lease ran out: their run is gone (its worker died, or Celery's hard
    time limit killed it). Hand them out again, or end them as FAILED."""
    now = utcnow()
    rows = session.execute(
        select(Task.id, Task.type, Task.attempt, Task.deliveries, Task.started_at)
        .where(Task.status == TaskStatus.RUNNING.value, Task.lease_expires_at < now)
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
            values = {"status": TaskStatus.QUEUED.value, "published_at": None}
            reaped.requeued += 1
        session.execute(
            update(Task)
            .where(
                Task.id == row.id,
                Task.attempt == row.attempt,
                Task.deliveries == row.deliveries,
                Task.status == TaskStatus.RUNNING.value,
                Task.lease_expires_at < now,
            )
            .values(lease_expires_at=None, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
    return reaped


def lost_too_often(lost_runs: int, *, max_deliveries: int) -> bool:
    """Poison: every one of `max_deliveries` runs of this attempt died with its worker.

    The one test of it, for the reaper (a lease ran out on the last run) and for a worker that
    is handed the attempt once more (its claim counts the lost runs before it)."""
    return lost_runs >= max_deliveries


def worker_lost(lost_runs: int) -> str:
    return f"the worker was lost {lost_runs} times running this attempt"


def _failed(now: datetime, kind: str, message: str) -> dict[str, Any]:
    return {
        "status": TaskStatus.FAILED.value,
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
    waiting = [state.value for state in WAITING]
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


def due_unpublished(*, session: Session, limit: int, grace: float, lock: bool) -> list[Task]:
    """The outbox: waiting rows the broker has not been told about, due now.

    Rows changed in the last `grace` seconds are left to the API's own publish, so the
    two rarely send the same message twice (twice is harmless, only wasteful).
    """
    now = utcnow()
    query = (
        select(Task)
        .where(
            Task.status.in_([state.value for state in WAITING]),
            Task.published_at.is_(None),
            Task.run_after <= now,
            Task.updated_at <= now - timedelta(seconds=grace),
        )
        .order_by(Task.priority.desc(), Task.run_after)
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def mark_many_published(*, session: Session, published: list[tuple[uuid.UUID, int]]) -> None:
    """One UPDATE for a whole batch: the dispatcher publishes hundreds per round trip."""
    if not published:
        return
    now = utcnow()
    session.execute(
        update(Task)
        .where(tuple_(Task.id, Task.attempt).in_(published), Task.published_at.is_(None))
        .values(published_at=now, queued_at=func.coalesce(Task.queued_at, now))
        .execution_options(synchronize_session=False)
    )


def unmark_published(*, session: Session, task_id: uuid.UUID, attempt: int) -> None:
    """The publish promised at insert did not happen: hand the task to the dispatcher."""
    session.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.status == TaskStatus.QUEUED.value)
        .values(published_at=None, queued_at=None)
        .execution_options(synchronize_session=False)
    )
