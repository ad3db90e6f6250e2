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

The run history (`task_run`, one row per delivery of each attempt) is written by these same
statements, never by one of its own: on PostgreSQL the claim's UPDATE feeds the new run's
INSERT, and each outcome's UPDATE an upsert of the run's row, in one data-modifying CTE; on
SQLite, which has none, the run's row is a second statement of the same local transaction. A
write that loses its fence writes no run row either. What ends a run from outside (a cancel,
the reaper, a bulk action) ends its row in its own transaction (`end_runs`).
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
    Executable,
    Integer,
    Table,
    Update,
    and_,
    bindparam,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from app.core.db import DirectConnection
from app.db.base import UTCDateTime, utcnow
from app.tasks.models import Task, TaskRun
from app.tasks.states import WAITING, RunOutcome, TaskStatus, sources

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


def new_attempt(*, attempt: Any, budget: Any, now: datetime) -> dict[str, Any]:
    """The values that make a finished task QUEUED again as a new attempt with a fresh retry
    budget (the single and the bulk retry). `attempt` and `budget` are numbers or SQL
    expressions of the row."""
    return {
        "attempt": attempt + 1,
        "max_attempts": attempt + 1 + budget,
        "status": TaskStatus.QUEUED,
        "deliveries": 0,
        "run_after": now,
        "published_at": None,
        "queued_at": None,
        "lease_expires_at": None,
        "started_at": None,
        "finished_at": None,
        "result": None,
        "error": None,
        # The new attempt's end owes its own webhook.
        "notified_at": None,
        "updated_at": now,
    }


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
_id = bindparam("b_id", type_=_c.id.type)
_attempt = bindparam("b_attempt", type_=Integer())
_worker = bindparam("b_worker", type_=_c.worker.type)
_this_attempt = and_(_c.id == _id, _c.attempt == _attempt)
_CLAIM_TASK = (
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
        worker=_worker,
        started_at=_now,
        updated_at=_now,
    )
)
_CLAIMED = (_c.deliveries, _c.type, _c.payload, _c.max_attempts, _c.run_after)
_delivery = bindparam("b_delivery", type_=Integer())

# The run history (task_run): each statement that moves a run's task writes the run's row too,
# in the same round trip on PostgreSQL (a data-modifying CTE). SQLite has none: there the row
# is a second statement of the same local transaction.
_runs = cast(Table, TaskRun.__table__)
_r = _runs.c
_RUN_KEY = [_r.task_id, _r.attempt, _r.delivery]


def _running_runs_of(task_id: Any, attempt: Any) -> ColumnElement[bool]:
    return and_(_r.task_id == task_id, _r.attempt == attempt, _r.outcome == RunOutcome.RUNNING)


def _claim_with_run() -> Executable:
    """The claim, the earlier runs of the attempt it supersedes ended LOST (a redelivery after
    their lease ran out), and the new run's row: one statement."""
    claimed = _CLAIM_TASK.returning(_c.id, _c.attempt, *_CLAIMED).cte("claimed")
    superseded = (
        update(_runs)
        .where(_running_runs_of(claimed.c.id, claimed.c.attempt))
        .values(outcome=RunOutcome.LOST, finished_at=_now)
        .cte("superseded")
    )
    started = (
        postgresql.insert(_runs)
        .from_select(
            ["task_id", "attempt", "delivery", "worker", "outcome", "started_at"],
            select(
                claimed.c.id,
                claimed.c.attempt,
                claimed.c.deliveries,
                _worker,
                literal(RunOutcome.RUNNING.value),
                _now,
            ),
        )
        .on_conflict_do_nothing()
        .cte("started")
    )
    return (
        select(*(claimed.c[column.name] for column in _CLAIMED))
        .add_cte(superseded)
        .add_cte(started)
    )


_CLAIM: dict[str, Executable] = {
    "postgresql": _claim_with_run(),
    "sqlite": _CLAIM_TASK.returning(*_CLAIMED),
}
# SQLite's second and third statements of a claim.
_SUPERSEDE = (
    update(_runs)
    .where(_running_runs_of(_id, _attempt), _r.delivery < _delivery)
    .values(outcome=RunOutcome.LOST, finished_at=_now)
)
_START = (
    sqlite.insert(_runs)
    .values(
        task_id=_id,
        attempt=_attempt,
        delivery=_delivery,
        worker=_worker,
        outcome=RunOutcome.RUNNING,
        started_at=_now,
    )
    .on_conflict_do_nothing()
)
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


@dataclass(frozen=True)
class _Outcome:
    """An outcome's write: the task's fenced UPDATE, and the run's row once it has won.

    On PostgreSQL `write` is both in one statement (the run's row an upsert fed by the
    UPDATE's RETURNING: a claim a database crash forgot has no row yet); `then` is SQLite's
    second statement."""

    write: Executable
    then: Executable | None


def _for_dialect(
    statement: Update, outcome: RunOutcome, error: ColumnElement[Any]
) -> dict[str, _Outcome]:
    done = _durable(statement).returning(_c.id, _c.worker, _c.started_at).cte("done")
    return {
        "postgresql": _Outcome(_end_run(postgresql.insert, done, outcome, error), None),
        "sqlite": _Outcome(
            statement, _end_run(sqlite.insert, _table, outcome, error, where=_c.id == _id)
        ),
    }


def _end_run(
    insert: Any,
    source: Any,
    outcome: RunOutcome,
    error: ColumnElement[Any],
    where: ColumnElement[bool] | None = None,
) -> Executable:
    """This run's row (keyed by its fence) ended with `outcome`."""
    row = select(
        source.c.id,
        _attempt,
        _delivery,
        source.c.worker,
        literal(outcome.value),
        error,
        func.coalesce(source.c.started_at, _now),
        _now,
    )
    if where is not None:
        row = row.where(where)
    columns = ["task_id", "attempt", "delivery", "worker", "outcome", "error", "started_at"]
    statement = insert(_runs).from_select([*columns, "finished_at"], row)
    upsert: Executable = statement.on_conflict_do_update(
        index_elements=_RUN_KEY,
        set_={
            "outcome": statement.excluded.outcome,
            "error": statement.excluded.error,
            "finished_at": statement.excluded.finished_at,
        },
    )
    # SQLAlchemy drops an INSERT's rowcount unless asked to keep it.
    return upsert.execution_options(preserve_rowcount=True)


def _write(session: Executor, statements: dict[str, _Outcome], parameters: dict[str, Any]) -> bool:
    chosen = statements[_dialect(session)]
    won = rowcount(session.execute(chosen.write, parameters)) == 1
    if won and chosen.then is not None:
        session.execute(chosen.then, parameters)
    return won


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
    ),
    RunOutcome.SUCCEEDED,
    null(),
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
    parameters = {
        "b_id": task_id,
        "b_attempt": attempt,
        "b_now": now,
        "b_lease": now + timedelta(seconds=lease_seconds),
        "b_worker": worker[:255],
    }
    dialect = _dialect(session)
    row = session.execute(_CLAIM[dialect], parameters).one_or_none()
    if row is None:
        return None
    if dialect != "postgresql":
        parameters["b_delivery"] = row.deliveries
        session.execute(_SUPERSEDE, parameters)
        session.execute(_START, parameters)
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
    return _write(session, _SUCCEED, {**_fence(claim), "b_result": result, "b_now": utcnow()})


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
    ),
    RunOutcome.FAILED,
    _error,
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
    ),
    RunOutcome.FAILED,
    _error,
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
    return target if _write(session, statement, parameters) else None


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


def end_runs(
    *,
    session: Session,
    attempts: list[tuple[uuid.UUID, int]],
    outcome: RunOutcome,
    error: dict[str, Any] | None = None,
) -> None:
    """End the running runs of these (task, attempt) pairs, whose task another writer (a
    cancel, the reaper) has just moved in the same transaction."""
    if not attempts:
        return
    session.execute(
        update(TaskRun)
        .where(
            tuple_(TaskRun.task_id, TaskRun.attempt).in_(attempts),
            TaskRun.outcome == RunOutcome.RUNNING,
        )
        .values(outcome=outcome, error=error, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
