"""The console's reads. Each is bounded: no page counts or sorts the whole table."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Integer,
    Row,
    Select,
    String,
    Table,
    and_,
    bindparam,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput
from app.db.base import utcnow
from app.tasks import service
from app.tasks.models import Task, TaskRun
from app.tasks.service import decode_cursor
from app.tasks.states import WAITING, TaskStatus
from app.webhooks import service as webhooks_service
from app.webhooks.schemas import DeliveryRead
from app.workers import service as workers_service
from app.workers.models import WorkerRecord
from app.workers.service import QueueReport

_TABLE = cast(Table, Task.__table__)
# Counts stop here and show "N+": counting a million rows costs what the page must not.
COUNT_LIMIT = 1000
STATUS_COUNT_LIMIT = 10_000
CHART_MINUTES = 60
# Minutes this close to now may still gain a finish whose write is under way (ChartMinutes).
CHART_GRACE_MINUTES = 2
_LIST_COLUMNS = (
    "id",
    "type",
    "status",
    "queue",
    "attempt",
    "max_attempts",
    "idempotency_key",
    "created_at",
    "finished_at",
)


def _invalid(where: str, message: str) -> InvalidInput:
    return InvalidInput(
        message, fields=[{"loc": ["query", where], "msg": message, "type": "value"}]
    )


@dataclass
class TaskFilters:
    """The list page's filters, as given in its query string."""

    status: TaskStatus | None = None
    type: str | None = None
    queue: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    idempotency_key: str | None = None
    request_id: str | None = None
    contains: dict[str, Any] | None = None
    raw: dict[str, str] = field(default_factory=dict)


def parse_contains(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise _invalid("contains", "the payload filter is not JSON") from None
    if not isinstance(value, dict):
        raise _invalid("contains", 'the payload filter must be a JSON object, e.g. {"user_id": 7}')
    return value


@dataclass(frozen=True)
class Count:
    value: int
    more: bool

    def __str__(self) -> str:
        return f"{self.value}+" if self.more else str(self.value)


def _filtered(query: Select[Any], *, owner: str | None, filters: TaskFilters, dialect: str) -> Any:
    conditions: list[Any] = []
    if owner is not None:
        conditions.append(_TABLE.c.owner == owner)
    if filters.status is not None:
        conditions.append(_TABLE.c.status == filters.status)
    for name in ("type", "queue", "idempotency_key", "request_id"):
        value = getattr(filters, name)
        if value is not None:
            conditions.append(_TABLE.c[name] == value)
    if filters.created_from is not None:
        conditions.append(_TABLE.c.created_at >= filters.created_from)
    if filters.created_to is not None:
        conditions.append(_TABLE.c.created_at < filters.created_to)
    if filters.contains is not None:
        if dialect != "postgresql":
            raise _invalid(
                "contains", "the payload filter needs PostgreSQL; the embedded database lacks @>"
            )
        conditions.append(
            sql_cast(_TABLE.c.payload, JSONB).op("@>")(
                sql_cast(bindparam("contains", json.dumps(filters.contains), String), JSONB)
            )
        )
    return query.where(*conditions)


def encode_cursor(row: Row[Any]) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def list_tasks(
    *,
    session: Session,
    owner: str | None,
    filters: TaskFilters,
    limit: int,
    cursor: str | None,
) -> tuple[list[Row[Any]], str | None, Count]:
    """A page newest first by keyset on (created_at, id), and the filter's bounded count."""
    dialect = session.get_bind().dialect.name
    query = _filtered(
        select(*(_TABLE.c[name] for name in _LIST_COLUMNS)),
        owner=owner,
        filters=filters,
        dialect=dialect,
    )
    if cursor is not None:
        created_at, task_id = decode_cursor(cursor)
        query = query.where(
            or_(
                _TABLE.c.created_at < created_at,
                and_(_TABLE.c.created_at == created_at, _TABLE.c.id < task_id),
            )
        )
    order = (_TABLE.c.created_at.desc(), _TABLE.c.id.desc())
    rows = list(session.execute(query.order_by(*order).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    counted = _filtered(
        select(literal_column("1")), owner=owner, filters=filters, dialect=dialect
    ).limit(COUNT_LIMIT + 1)
    total = int(session.scalar(select(func.count()).select_from(counted.subquery())) or 0)
    return rows[:limit], next_cursor, Count(min(total, COUNT_LIMIT), total > COUNT_LIMIT)


@dataclass(frozen=True)
class Overview:
    statuses: dict[TaskStatus, Count]
    queues: list[QueueReport]
    workers: list[WorkerRecord]
    outbox: int
    outbox_oldest_seconds: float
    dispatcher_ok: bool
    now: datetime


def _status_counts(*, session: Session, owner: str | None) -> dict[TaskStatus, Count]:
    """Each status counted up to a bound, all in one statement, on the status indexes."""
    columns = []
    for status in TaskStatus:
        inner: Select[Any] = select(literal_column("1")).where(_TABLE.c.status == status)
        if owner is not None:
            inner = inner.where(_TABLE.c.owner == owner)
        bounded = inner.limit(STATUS_COUNT_LIMIT + 1).subquery()
        columns.append(
            select(func.count()).select_from(bounded).scalar_subquery().label(status.value)
        )
    row = session.execute(select(*columns)).one()
    return {
        status: Count(min(int(n), STATUS_COUNT_LIMIT), int(n) > STATUS_COUNT_LIMIT)
        for status, n in zip(TaskStatus, row, strict=True)
    }


class ChartMinutes:
    """The chart's closed minutes, per owner (None: every owner), kept by each API process.

    A minute more than CHART_GRACE_MINUTES old no longer changes: a task's `finished_at` is the
    time of its outcome's write. So each chart reads only the minutes since the last one it
    kept: on a busy table a few thousand index entries, not the hour's hundreds of thousands.
    What it does not see: a bulk retry of a task that failed in a kept minute (it stays counted
    there, as it did fail then), and a retention period shorter than an hour."""

    def __init__(self, owners: int = 256) -> None:
        self._owners = owners
        self._kept: dict[str | None, dict[int, tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def get(self, owner: str | None, first: int) -> dict[int, tuple[int, int]]:
        with self._lock:
            kept = self._kept.get(owner, {})
            return {minute: counts for minute, counts in kept.items() if minute >= first}

    def keep(self, owner: str | None, minutes: dict[int, tuple[int, int]]) -> None:
        """After each chart: the owner becomes the most recently used (last in the dict)."""
        with self._lock:
            self._kept.pop(owner, None)
            self._kept[owner] = minutes
            while len(self._kept) > self._owners:
                del self._kept[next(iter(self._kept))]


def chart(
    *, session: Session, owner: str | None, kept: ChartMinutes | None = None
) -> list[tuple[int, int]]:
    """Tasks succeeded and failed per minute over the last hour, oldest minute first (on
    ix_task_finished). Its own request (the overview's image): the page does not wait for it.
    With `kept`, only the minutes after the closed ones it holds are read."""
    now = utcnow()
    since = now - timedelta(minutes=CHART_MINUTES)
    first = int(since.timestamp()) // 60 + 1
    closed = int(now.timestamp()) // 60 - CHART_GRACE_MINUTES
    known = kept.get(owner, first) if kept is not None else {}
    start = max(known, default=first - 1) + 1
    if session.get_bind().dialect.name == "postgresql":
        minute: Any = func.floor(func.extract("epoch", _TABLE.c.finished_at) / 60)
    else:
        minute = sql_cast(func.strftime("%s", _TABLE.c.finished_at), Integer) / 60
    query = (
        select(sql_cast(minute, Integer).label("minute"), _TABLE.c.status, func.count())
        .where(
            _TABLE.c.finished_at.is_not(None),
            _TABLE.c.finished_at >= datetime.fromtimestamp(start * 60, UTC),
            _TABLE.c.status.in_([TaskStatus.SUCCEEDED, TaskStatus.FAILED]),
        )
        .group_by(literal_column("minute"), _TABLE.c.status)
    )
    if owner is not None:
        query = query.where(_TABLE.c.owner == owner)
    counts = {m: [0, 0] for m in range(start, first + CHART_MINUTES)}
    for bucket, status, count in session.execute(query):
        if int(bucket) in counts:
            counts[int(bucket)][0 if status == TaskStatus.SUCCEEDED else 1] += int(count)
    series = {**known, **{m: (ok, failed) for m, (ok, failed) in counts.items()}}
    if kept is not None:
        kept.keep(owner, {m: c for m, c in series.items() if m <= closed})
    return [series.get(m, (0, 0)) for m in range(first, first + CHART_MINUTES)]


def overview(
    *,
    session: Session,
    owner: str | None,
    known_queues: set[str],
    heartbeat_max_age: float,
    dispatcher_lag: float,
) -> Overview:
    now = utcnow()
    waiting = sorted(WAITING)
    outbox, oldest = session.execute(
        select(func.count(), func.min(_TABLE.c.run_after)).where(
            _TABLE.c.status.in_(waiting),
            _TABLE.c.published_at.is_(None),
            _TABLE.c.run_after <= now,
        )
    ).one()
    oldest_seconds = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
    return Overview(
        statuses=_status_counts(session=session, owner=owner),
        queues=workers_service.queue_report(
            session=session, known=known_queues, max_age=heartbeat_max_age
        ),
        workers=workers_service.live_workers(session=session, max_age=heartbeat_max_age),
        outbox=int(outbox or 0),
        outbox_oldest_seconds=oldest_seconds,
        # The dispatcher publishes what the API could not; due work left unpublished longer
        # than a few of its ticks means it is down or stuck.
        dispatcher_ok=oldest_seconds <= dispatcher_lag,
        now=now,
    )


@dataclass(frozen=True)
class Detail:
    task: Task
    runs: list[TaskRun]
    deliveries: list[DeliveryRead]


def task_detail(*, session: Session, task_id: uuid.UUID, owner: str | None) -> Detail:
    """A task by id as the API reads it (another owner's is TaskNotFound, 404), with its runs
    and webhook deliveries, in one transaction: the three agree with each other."""
    task = service.get(session=session, task_id=task_id, owner=owner)
    return Detail(
        task=task,
        runs=service.list_runs(session=session, task_id=task_id, owner=owner),
        deliveries=webhooks_service.list_deliveries(session=session, task_id=task_id, owner=owner),
    )
