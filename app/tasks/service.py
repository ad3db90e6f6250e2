"""The API side of the record: submit, read, list, cancel, retry. Callers commit."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from pydantic import ValidationError
from sqlalchemy import Table, and_, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.config import get_settings
from app.core.errors import InvalidInput, field_errors
from app.db.base import utcnow
from app.tasks import lifecycle
from app.tasks.exceptions import (
    IdempotencyConflict,
    QuotaExceeded,
    TaskFinished,
    TaskNotFound,
)
from app.tasks.models import Task
from app.tasks.publisher import Doorbell
from app.tasks.registry import get_task_type, known_queues
from app.tasks.schemas import TaskCreate
from app.tasks.states import (
    TERMINAL,
    UNFINISHED,
    IllegalTransition,
    TaskStatus,
    check_transition,
    sources,
)


def request_hash(data: TaskCreate) -> str:
    canonical = json.dumps(data.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit(
    *,
    session: Session,
    data: TaskCreate,
    owner: str,
    idempotency_key: str | None,
    request_id: str | None = None,
    max_unfinished: int = 0,
    publishing: bool = False,
) -> tuple[Task, bool]:
    """Record a new task (QUEUED); returns (task, created).

    Its only write is one INSERT, so the API runs it with each statement committed on its own
    (`Database.autocommit`): keep it so, or move it to `Database.transaction`.

    With `publishing`, a task due now is recorded as published in the same insert: the caller
    publishes right after its commit, and calls `unmark_published` if that fails. One commit
    per submit instead of two; if the process dies between commit and publish, the dispatcher's
    lost-message sweep publishes it later (TASKDOCK_REPUBLISH_AFTER_SECONDS).
    """
    task_type = get_task_type(data.type)
    try:
        payload = task_type.validate_payload(data.payload).model_dump(mode="json")
    except ValidationError as exc:
        fields = field_errors(exc.errors())
        for error in fields:
            error["loc"] = ["body", "payload", *error["loc"]]
        raise InvalidInput("payload does not match the task type's input", fields=fields) from None

    queue = data.queue or task_type.queue
    if queue not in known_queues(get_settings().extra_queues):
        # No worker would ever consume it: the task would wait forever.
        raise InvalidInput(
            f"unknown queue {queue!r}",
            fields=[
                {"loc": ["body", "queue"], "msg": f"unknown queue {queue!r}", "type": "unknown"}
            ],
        )
    digest = request_hash(data)
    if idempotency_key is not None:
        existing = _by_idempotency_key(session=session, owner=owner, key=idempotency_key)
        if existing is not None:
            return _same_request(existing, digest), False

    if max_unfinished:
        _check_quota(session=session, owner=owner, limit=max_unfinished)

    now = utcnow()
    run_after = now
    if data.countdown is not None:
        run_after = now + timedelta(seconds=data.countdown)
    elif data.eta is not None:
        run_after = max(now, data.eta)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "type": task_type.name,
        "payload": payload,
        "status": TaskStatus.QUEUED.value,
        "queue": queue,
        "priority": data.priority,
        "attempt": 1,
        "max_attempts": task_type.max_attempts,
        "deliveries": 0,
        "run_after": run_after,
        "owner": owner,
        "idempotency_key": idempotency_key,
        "request_hash": digest,
        "request_id": request_id,
        "created_at": now,
        "updated_at": now,
    }
    if publishing and run_after <= now:
        values["published_at"] = values["queued_at"] = now
    # A prepared Core INSERT with the row as parameters, not session.add(): the ORM's flush,
    # or building a statement around the values, cost more CPU than the round trip.
    plain, unless_repeated = _inserts(session)
    if idempotency_key is None:
        session.execute(plain, values)
        return Task(**values), True
    # The key's unique constraint settles concurrent repeats in the one statement.
    if session.execute(unless_repeated, values).first() is None:
        existing = _by_idempotency_key(session=session, owner=owner, key=idempotency_key)
        if existing is None:
            raise RuntimeError("idempotency key conflict, yet no task holds the key")
        return _same_request(existing, digest), False
    return Task(**values), True


_INSERTS: dict[str, tuple[Any, Any]] = {}


def _inserts(session: Session) -> tuple[Any, Any]:
    """INSERT, and INSERT unless the idempotency key is taken, in the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect not in _INSERTS:
        table = cast(Table, Task.__table__)
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        _INSERTS[dialect] = (
            insert(table),
            insert(table)
            .on_conflict_do_nothing(index_elements=["owner", "idempotency_key"])
            .returning(table.c.id),
        )
    return _INSERTS[dialect]


def _check_quota(*, session: Session, owner: str, limit: int) -> None:
    unfinished = session.scalar(
        select(func.count()).where(
            Task.owner == owner, Task.status.in_([state.value for state in UNFINISHED])
        )
    )
    if (unfinished or 0) >= limit:
        raise QuotaExceeded(
            f"this API key has {unfinished} unfinished tasks; the quota is {limit}", quota=limit
        )


def _by_idempotency_key(*, session: Session, owner: str, key: str) -> Task | None:
    return session.scalars(
        select(Task).where(Task.owner == owner, Task.idempotency_key == key)
    ).one_or_none()


def _same_request(task: Task, digest: str) -> Task:
    if task.request_hash != digest:
        raise IdempotencyConflict(task_id=str(task.id))
    return task


def get(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Task:
    """A task by id; another owner's task is as absent as an unknown one."""
    query = select(Task).where(Task.id == task_id)
    if owner is not None:
        query = query.where(Task.owner == owner)
    task = session.scalars(query).one_or_none()
    if task is None:
        raise TaskNotFound(task_id=str(task_id))
    return task


def encode_cursor(task: Task) -> str:
    raw = f"{task.created_at.isoformat()}|{task.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, task_id = raw.split("|", 1)
        parsed = datetime.fromisoformat(created)
        if parsed.tzinfo is None:
            raise ValueError("naive")
        return parsed.astimezone(UTC), uuid.UUID(task_id)
    except (ValueError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(
            "malformed cursor",
            fields=[{"loc": ["query", "cursor"], "msg": "malformed cursor", "type": "value_error"}],
        ) from None


def list_tasks(
    *,
    session: Session,
    owner: str | None,
    status: TaskStatus | None,
    type_: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[Task], str | None]:
    """A page, newest first, by keyset on (created_at, id) so pages never shift."""
    query = select(Task)
    if owner is not None:
        query = query.where(Task.owner == owner)
    if status is not None:
        query = query.where(Task.status == status.value)
    if type_ is not None:
        query = query.where(Task.type == type_)
    if cursor is not None:
        created_at, task_id = decode_cursor(cursor)
        query = query.where(
            or_(
                Task.created_at < created_at, and_(Task.created_at == created_at, Task.id < task_id)
            )
        )
    rows = list(
        session.scalars(query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1))
    )
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def cancel(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Task:
    """Record CANCELLED; a running attempt learns it from its lease and stops."""
    task = get(session=session, task_id=task_id, owner=owner)
    # Twice at most: a worker may move the task to its next attempt between read and write.
    for _ in range(2):
        current = TaskStatus(task.status)
        if current.terminal:
            raise TaskFinished(f"a {current.value} task cannot be cancelled", status=current.value)
        check_transition(current, TaskStatus.CANCELLED)
        now = utcnow()
        changed = lifecycle.rowcount(
            session.execute(
                update(Task)
                .where(
                    Task.id == task.id,
                    Task.attempt == task.attempt,
                    Task.status == current.value,
                )
                .values(
                    status=TaskStatus.CANCELLED.value,
                    finished_at=now,
                    updated_at=now,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
        )
        session.refresh(task)
        if changed:
            return task
    raise TaskFinished(f"a {task.status} task cannot be cancelled", status=task.status)


def retry(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Task:
    """Run a FAILED or CANCELLED task again as a new attempt with a fresh retry budget."""
    task = get(session=session, task_id=task_id, owner=owner)
    check_transition(TaskStatus(task.status), TaskStatus.QUEUED)
    budget = get_task_type(task.type).retry.max_retries
    now = utcnow()
    changed = lifecycle.rowcount(
        session.execute(
            update(Task)
            .where(
                Task.id == task.id,
                Task.attempt == task.attempt,
                # Only a finished task: two concurrent retries make one new attempt, not two.
                Task.status.in_(sources(TaskStatus.QUEUED) & TERMINAL),
            )
            .values(
                attempt=task.attempt + 1,
                max_attempts=task.attempt + 1 + budget,
                status=TaskStatus.QUEUED.value,
                deliveries=0,
                run_after=now,
                published_at=None,
                queued_at=None,
                lease_expires_at=None,
                started_at=None,
                finished_at=None,
                result=None,
                error=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
    )
    session.refresh(task)
    if not changed:
        raise IllegalTransition(f"a {task.status} task cannot be retried", status=task.status)
    return task


def doorbell(task: Task) -> Doorbell:
    """What the broker is told about a committed record."""
    return Doorbell(
        task_id=task.id,
        attempt=task.attempt,
        type=task.type,
        queue=task.queue,
        priority=task.priority,
        time_limit=get_task_type(task.type).time_limit or get_settings().task_default_time_limit,
        request_id=task.request_id,
    )


def mark_published(*, session: Session, task_id: uuid.UUID, attempt: int) -> None:
    lifecycle.mark_many_published(session=session, published=[(task_id, attempt)])


def unmark_published(*, session: Session, task_id: uuid.UUID, attempt: int) -> None:
    """The publish promised at insert did not happen: hand the task to the dispatcher."""
    session.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.status == TaskStatus.QUEUED.value)
        .values(published_at=None, queued_at=None)
        .execution_options(synchronize_session=False)
    )
