"""Bulk cancel and retry: the single-task transitions, applied by filter, a batch at a time.

Each batch is one transaction of two statements: the next `BATCH` matching tasks by keyset on
(created_at, id), then one conditional UPDATE of them whose WHERE clause is the single route's
(cancel: a state that may become CANCELLED; retry: FAILED or CANCELLED, fenced by the attempt
read), so a task a worker or another request moved in between is matched but left alone. A
request that fails half-way keeps the batches it committed; repeating it takes what is left,
since a task cancelled or retried no longer matches.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, case, or_, select, tuple_, update
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput
from app.db.base import utcnow
from app.tasks import lifecycle
from app.tasks.models import Task
from app.tasks.registry import all_task_types
from app.tasks.schemas import BULK_IDS_SHOWN, BulkAction, BulkResult
from app.tasks.states import TERMINAL, RunOutcome, TaskStatus, sources

if TYPE_CHECKING:
    from app.api.deps import Database

# Rows per transaction: short locks, and a few dozen round trips for the largest request.
BATCH = 500

CANCELLABLE = sources(TaskStatus.CANCELLED) - TERMINAL
RETRYABLE = sources(TaskStatus.QUEUED) & TERMINAL

Keyset = tuple[datetime, uuid.UUID]


@dataclass(frozen=True)
class Batch:
    matched: int
    changed: list[tuple[uuid.UUID, str]]  # (task id, type)
    last: Keyset | None  # where the next batch starts; None when nothing matched


@dataclass
class Outcome:
    """A whole request's result, and the changed tasks' types for the metrics."""

    result: BulkResult
    types: dict[str, int]


async def cancel(*, database: Database, action: BulkAction, owner: str | None) -> Outcome:
    return await _run(
        database=database, action=action, owner=owner, batch=cancel_batch, statuses=CANCELLABLE
    )


async def retry(*, database: Database, action: BulkAction, owner: str | None) -> Outcome:
    return await _run(
        database=database, action=action, owner=owner, batch=retry_batch, statuses=RETRYABLE
    )


async def _run(
    *,
    database: Database,
    action: BulkAction,
    owner: str | None,
    batch: Callable[..., Batch],
    statuses: frozenset[TaskStatus],
) -> Outcome:
    """Dry run: one read. Otherwise batches, each committed, until `limit` tasks matched."""
    _check_statuses(action, statuses)
    if action.dry_run:
        ids = await database.autocommit(
            matching_ids, action=action, owner=owner, statuses=statuses, after=None
        )
        shown = ids if len(ids) <= BULK_IDS_SHOWN else None
        return Outcome(BulkResult(matched=len(ids), changed=0, dry_run=True, ids=shown), {})
    matched, after = 0, None
    changed: list[tuple[uuid.UUID, str]] = []
    while matched < action.limit:
        size = min(BATCH, action.limit - matched)
        done: Batch = await database.transaction(
            batch, action=action, owner=owner, after=after, size=size
        )
        matched += done.matched
        changed.extend(done.changed)
        if done.matched < size or done.last is None:
            break
        after = done.last
    types: dict[str, int] = {}
    for _, type_ in changed:
        types[type_] = types.get(type_, 0) + 1
    shown = [task_id for task_id, _ in changed] if len(changed) <= BULK_IDS_SHOWN else None
    result = BulkResult(matched=matched, changed=len(changed), dry_run=False, ids=shown)
    return Outcome(result, types)


def _check_statuses(action: BulkAction, statuses: frozenset[TaskStatus]) -> None:
    refused = sorted(set(action.status or ()) - statuses)
    if refused:
        allowed = ", ".join(sorted(statuses))
        message = f"this action takes only tasks in {allowed}, not {', '.join(refused)}"
        raise InvalidInput(
            message, fields=[{"loc": ["body", "status"], "msg": message, "type": "value_error"}]
        )


def _where(
    action: BulkAction,
    *,
    owner: str | None,
    statuses: frozenset[TaskStatus],
    after: Keyset | None,
) -> list[ColumnElement[bool]]:
    wanted = set(action.status) & statuses if action.status else statuses
    where: list[ColumnElement[bool]] = [Task.status.in_(sorted(wanted))]
    if owner is not None:
        where.append(Task.owner == owner)
    if action.ids is not None:
        where.append(Task.id.in_(action.ids))
    if action.type is not None:
        where.append(Task.type == action.type)
    if action.queue is not None:
        where.append(Task.queue == action.queue)
    if action.created_after is not None:
        where.append(Task.created_at >= action.created_after)
    if action.created_before is not None:
        where.append(Task.created_at < action.created_before)
    if after is not None:
        created_at, task_id = after
        same_time = and_(Task.created_at == created_at, Task.id > task_id)
        where.append(or_(Task.created_at > created_at, same_time))
    return where


def _pick(
    session: Session,
    action: BulkAction,
    *,
    owner: str | None,
    statuses: frozenset[TaskStatus],
    after: Keyset | None,
    size: int,
    extra: list[ColumnElement[bool]] | None = None,
) -> list[Any]:
    where = _where(action, owner=owner, statuses=statuses, after=after) + (extra or [])
    return list(
        session.execute(
            select(Task.id, Task.attempt, Task.created_at)
            .where(*where)
            .order_by(Task.created_at, Task.id)
            .limit(size)
        ).all()
    )


def matching_ids(
    *,
    session: Session,
    action: BulkAction,
    owner: str | None,
    statuses: frozenset[TaskStatus],
    after: Keyset | None,
) -> list[uuid.UUID]:
    """The dry run: the tasks the action would take now, oldest first."""
    extra = _known_types() if statuses == RETRYABLE else None
    rows = _pick(
        session,
        action,
        owner=owner,
        statuses=statuses,
        after=after,
        size=action.limit,
        extra=extra,
    )
    return [row.id for row in rows]


def _last(rows: list[Any]) -> Keyset | None:
    return (rows[-1].created_at, rows[-1].id) if rows else None


def cancel_batch(
    *, session: Session, action: BulkAction, owner: str | None, after: Keyset | None, size: int
) -> Batch:
    """Cancel the next `size` matching tasks, as `service.cancel` does each."""
    rows = _pick(session, action, owner=owner, statuses=CANCELLABLE, after=after, size=size)
    if not rows:
        return Batch(0, [], None)
    now = utcnow()
    changed = session.execute(
        update(Task)
        # The single cancel's condition, read again by the UPDATE itself: a task that
        # finished meanwhile stays as it is; one moved to its next attempt is still cancelled.
        .where(Task.id.in_([row.id for row in rows]), Task.status.in_(sorted(CANCELLABLE)))
        .values(status=TaskStatus.CANCELLED, finished_at=now, updated_at=now, lease_expires_at=None)
        .returning(Task.id, Task.attempt, Task.type)
        .execution_options(synchronize_session=False)
    ).all()
    lifecycle.end_runs(
        session=session,
        attempts=[(row.id, row.attempt) for row in changed],
        outcome=RunOutcome.CANCELLED,
    )
    return Batch(len(rows), [(row.id, row.type) for row in changed], _last(rows))


def _known_types() -> list[ColumnElement[bool]]:
    # A task whose type is no longer registered cannot run again: it is not matched.
    return [Task.type.in_([task.name for task in all_task_types()])]


def retry_batch(
    *, session: Session, action: BulkAction, owner: str | None, after: Keyset | None, size: int
) -> Batch:
    """Retry the next `size` matching tasks, as `service.retry` does each: a new attempt with a
    fresh retry budget (its type's max_retries)."""
    rows = _pick(
        session,
        action,
        owner=owner,
        statuses=RETRYABLE,
        after=after,
        size=size,
        extra=_known_types(),
    )
    if not rows:
        return Batch(0, [], None)
    budget = case(
        {task.name: task.retry.max_retries for task in all_task_types()},
        value=Task.type,
        else_=0,
    )
    now = utcnow()
    changed = session.execute(
        update(Task)
        # Fenced by the attempt read, as the single retry: two retries make one new attempt.
        .where(
            tuple_(Task.id, Task.attempt).in_([(row.id, row.attempt) for row in rows]),
            Task.status.in_(sorted(RETRYABLE)),
        )
        .values(lifecycle.new_attempt(attempt=Task.attempt, budget=budget, now=now))
        .returning(Task.id, Task.type)
        .execution_options(synchronize_session=False)
    ).all()
    return Batch(len(rows), [(row.id, row.type) for row in changed], _last(rows))
