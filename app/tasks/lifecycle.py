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
from collections.abc import Iterable
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
    return [_c.status == state for state in sorted(states)]


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
            and_(_c.status == TaskStatus.RUNNING, _c.lease_expires_at < _now),
        ),
    )
    .values(
        status=TaskStatus.RUNNING,
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
    and_(_c.status == TaskStatus.RUNNING, _c.deliveries == _delivery),
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
        status=TaskStatus.SUCCEEDED,
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
        status=TaskStatus.RUNNING,
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
        status=TaskStatus.RETRYING,
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
        status=TaskStatus.FAILED,
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
