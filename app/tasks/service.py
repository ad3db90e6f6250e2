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
from sqlalchemy import Select, Table, Text, and_, bindparam, func, or_, select, update
from sqlalchemy import cast as cast_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput, field_errors
from app.db.base import utcnow
from app.tasks import lifecycle
from app.tasks.exceptions import (
    IdempotencyConflict,
    QuotaExceeded,
    TaskFinished,
    TaskNotFound,
)
from app.tasks.models import Task, TaskRun
from app.tasks.registry import get_task_type, known_queues
from app.tasks.schemas import TaskCreate, TaskRead
from app.tasks.states import (
    TERMINAL,
    UNFINISHED,
    IllegalTransition,
    RunOutcome,
    TaskStatus,
    check_transition,
    sources,
)

_TABLE = cast(Table, Task.__table__)


def request_hash(data: TaskCreate) -> str:
    # Without an absent notify_url, so keys recorded before it existed still match.
    absent = {"notify_url"} if data.notify_url is None else None
    fields = data.model_dump(mode="json", exclude=absent)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def prepare(
    *,
    data: TaskCreate,
    owner: str,
    idempotency_key: str | None,
    extra_queues: list[str],
    request_id: str | None = None,
    publishing: bool = False,
) -> dict[str, Any]:
    """A submission's new row, validated: its payload against the type's input model, its
    queue against the known ones (the task types' and `extra_queues`, TASKDOCK_EXTRA_QUEUES).
    InvalidInput (422) names what is wrong; nothing is written.

    With `publishing`, a task due now is recorded as published: the API publishes it right
    after the commit and unmarks it if that fails (app/tasks/publication.py).
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
    if queue not in known_queues(extra_queues):
        # No worker would ever consume it: the task would wait forever.
        raise InvalidInput(
            f"unknown queue {queue!r}",
            fields=[
                {"loc": ["body", "queue"], "msg": f"unknown queue {queue!r}", "type": "unknown"}
            ],
        )
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
        "status": TaskStatus.QUEUED,
        "queue": queue,
        "priority": data.priority,
        "attempt": 1,
        "max_attempts": task_type.max_attempts,
        "deliveries": 0,
        "run_after": run_after,
        "published_at": None,
        "queued_at": None,
        "owner": owner,
        "idempotency_key": idempotency_key,
        # Only a repeat of the same key compares it: not worth its 20 µs on every submission.
        "request_hash": request_hash(data) if idempotency_key is not None else None,
        "request_id": request_id,
        "notify_url": data.notify_url,
        "created_at": now,
        "updated_at": now,
    }
    if publishing and run_after <= now:
        values["published_at"] = values["queued_at"] = now
    return values


def submit(
    *,
    session: Session,
    data: TaskCreate,
    owner: str,
    idempotency_key: str | None,
    extra_queues: list[str],
    request_id: str | None = None,
    max_unfinished: int = 0,
    publishing: bool = False,
) -> tuple[Task, bool]:
    """Record a submission (QUEUED) in a session; returns (task, created).

    The API sends only submissions with an Idempotency-Key this way; the others take the group
    commit (app/tasks/publication.py). Its only write is one INSERT, so the API runs it with
    each statement committed on its own (`Database.autocommit`): keep it so, or move it to
    `Database.transaction`.
    """
    values = prepare(
        data=data,
        owner=owner,
        idempotency_key=idempotency_key,
        extra_queues=extra_queues,
        request_id=request_id,
        publishing=publishing,
    )
    if idempotency_key is not None:
        existing = _by_idempotency_key(session=session, owner=owner, key=idempotency_key)
        if existing is not None:
            return _same_request(existing, values["request_hash"]), False
    if max_unfinished:
        _check_quota(session=session, owner=owner, limit=max_unfinished)
    # The key's unique constraint settles concurrent repeats in the one statement.
    inserted = session.execute(_unless_repeated(session), values).first() is not None
    if not inserted and idempotency_key is not None:
        existing = _by_idempotency_key(session=session, owner=owner, key=idempotency_key)
        if existing is None:
            raise RuntimeError("idempotency key conflict, yet no task holds the key")
        return _same_request(existing, values["request_hash"]), False
    return Task(**values), True


def insert_statement(dialect: str) -> Any:
    """The group commit's INSERT, run with many rows in one transaction."""
    return _inserts(dialect)[0]


_INSERTS: dict[str, tuple[Any, Any]] = {}


def _inserts(dialect: str) -> tuple[Any, Any]:
    """INSERT, and INSERT unless the idempotency key is taken, in a dialect; built once, with
    the row as parameters: building a statement around the values costs more than running it."""
    if dialect not in _INSERTS:
        table = _TABLE
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        _INSERTS[dialect] = (
            insert(table),
            insert(table)
            .on_conflict_do_nothing(index_elements=["owner", "idempotency_key"])
            .returning(table.c.id),
        )
    return _INSERTS[dialect]


def _unless_repeated(session: Session) -> Any:
    return _inserts(session.get_bind().dialect.name)[1]


# Unfinished tasks of one owner: the quota's count (an index-only scan of ix_task_owner_status).
# Equalities, not IN: it runs on app.core.db.Statements, compiled once, and an IN list's
# parameters are expanded per execution.
UNFINISHED_COUNT = select(func.count().label("count")).where(
    _TABLE.c.owner == bindparam("owner"),
    or_(*(_TABLE.c.status == state for state in sorted(UNFINISHED))),
)


def _check_quota(*, session: Session, owner: str, limit: int) -> None:
    check_quota(unfinished=session.scalar(UNFINISHED_COUNT, {"owner": owner}) or 0, limit=limit)


def check_quota(*, unfinished: int, limit: int) -> None:
    if unfinished >= limit:
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


# A result as its JSON text, not decoded by the driver: the API puts it into its answer as it is
# (app.tasks.router.task_json), and a list measures it before loading it.
RESULT_TEXT = cast_(_TABLE.c.result, Text).label("result")

# The hot read, built once: the columns TaskRead shows, by id, optionally limited to an owner.
_READ = select(
    *(RESULT_TEXT if name == "result" else _TABLE.c[name] for name in TaskRead.model_fields)
).where(_TABLE.c.id == bindparam("task_id"))
_READ_OWNED = _READ.where(_TABLE.c.owner == bindparam("owner"))


def read_statement(*, task_id: uuid.UUID, owner: str | None) -> tuple[Select[Any], dict[str, Any]]:
    """`get` as a Core statement and its parameters, for `Database.fetch_one`; the row's
    `result` is JSON text (`RESULT_TEXT`)."""
    if owner is None:
        return _READ, {"task_id": task_id}
    return _READ_OWNED, {"task_id": task_id, "owner": owner}


def list_runs(*, session: Session, task_id: uuid.UUID, owner: str | None) -> list[TaskRun]:
    """Every run of a task, oldest first; another owner's task is as absent as an unknown one."""
    query = select(Task.id).where(Task.id == task_id)
    if owner is not None:
        query = query.where(Task.owner == owner)
    if session.scalar(query) is None:
        raise TaskNotFound(task_id=str(task_id))
    return list(
        session.scalars(
            select(TaskRun)
            .where(TaskRun.task_id == task_id)
            .order_by(TaskRun.attempt, TaskRun.delivery)
        )
    )


def encode_cursor(created_at: datetime, task_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{task_id}".encode()
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


# A list item's columns: TaskRead's, but for the result, read only when asked for.
_LISTED = [_TABLE.c[name] for name in TaskRead.model_fields if name != "result"]


def _result_size(session: Session) -> Any:
    """A result's size in bytes, measured by the database without sending it."""
    text = cast_(_TABLE.c.result, Text)
    if session.get_bind().dialect.name == "postgresql":
        return func.coalesce(func.octet_length(text), 0)
    return func.coalesce(func.length(text), 0)  # ASCII-only JSON (app.core.db.json_dumps)


def list_tasks(
    *,
    session: Session,
    owner: str | None,
    status: TaskStatus | None,
    type_: str | None,
    limit: int,
    cursor: str | None,
    include_result: bool = False,
    max_bytes: int = 0,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of rows for TaskRead, newest first, by keyset on (created_at, id) so pages never
    shift. Without `include_result` no result is read; with it, each row's `result` is its JSON
    text (`RESULT_TEXT`), and the page ends early once its results pass `max_bytes` (it always
    has its first row)."""
    c = _TABLE.c
    columns = [*_LISTED, _result_size(session).label("result_size")] if include_result else _LISTED
    query = select(*columns)
    if owner is not None:
        query = query.where(c.owner == owner)
    if status is not None:
        query = query.where(c.status == status)
    if type_ is not None:
        query = query.where(c.type == type_)
    if cursor is not None:
        created_at, task_id = decode_cursor(cursor)
        query = query.where(
            or_(c.created_at < created_at, and_(c.created_at == created_at, c.id < task_id))
        )
    found = session.execute(query.order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1))
    rows = [dict(row) for row in found.mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    if include_result and rows:
        rows, cut = _within(rows, max_bytes)
        more = more or cut
        chosen = select(c.id, RESULT_TEXT).where(c.id.in_([row["id"] for row in rows]))
        texts: dict[uuid.UUID, str | None] = dict(session.execute(chosen).all())
        for row in rows:
            row["result"] = texts.get(row["id"])
    next_cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
    return rows, next_cursor


def _within(rows: list[dict[str, Any]], budget: int) -> tuple[list[dict[str, Any]], bool]:
    """The first rows whose results fit in `budget` bytes (the first row always), and whether
    some were left out."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        size = int(row.pop("result_size"))
        if kept and size > budget:
            return kept, True
        budget -= size
        kept.append(row)
    return kept, False


def cancel(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Task:
    """Record CANCELLED; a running attempt learns it from its lease and stops."""
    task = get(session=session, task_id=task_id, owner=owner)
    # Twice at most: a worker may move the task to its next attempt between read and write.
    for _ in range(2):
        current = task.status
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
                    Task.status == current,
                )
                .values(
                    status=TaskStatus.CANCELLED,
                    finished_at=now,
                    updated_at=now,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
        )
        if changed:
            # Its running run, if any, ends here: the worker learns it at its next renewal.
            lifecycle.end_runs(
                session=session, attempts=[(task.id, task.attempt)], outcome=RunOutcome.CANCELLED
            )
        session.refresh(task)
        if changed:
            return task
    raise TaskFinished(f"a {task.status} task cannot be cancelled", status=task.status)


def retry(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Task:
    """Run a FAILED or CANCELLED task again as a new attempt with a fresh retry budget."""
    task = get(session=session, task_id=task_id, owner=owner)
    check_transition(task.status, TaskStatus.QUEUED)
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
            .values(lifecycle.new_attempt(attempt=task.attempt, budget=budget, now=now))
            .execution_options(synchronize_session=False)
        )
    )
    if not changed:
        status = session.scalar(select(Task.status).where(Task.id == task.id))
        if status is None:
            # Purged by retention between the read and the update: gone, as for any reader.
            raise TaskNotFound(task_id=str(task_id))
        raise IllegalTransition(f"a {status} task cannot be retried", status=status)
    session.refresh(task)
    return task
