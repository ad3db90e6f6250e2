"""The worker registry: heartbeats in; who consumes which queue, and what waits there, out.

Each worker's consumer writes its row every few seconds (`app.worker.hooks`). A queue
whose tasks wait while no live worker consumes it is what `taskdock status` flags and the
`taskdock_queue_consumers` gauge alerts on: such tasks would stay QUEUED forever.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.tasks.models import Task
from app.tasks.states import WAITING, TaskStatus
from app.workers.models import WorkerRecord

# A worker silent for this long is gone for good: its row is dropped when another one starts.
FORGET_AFTER = timedelta(hours=1)


def beat(
    *,
    session: Session,
    name: str,
    queues: list[str],
    concurrency: int,
    pid: int,
    started_at: datetime,
) -> None:
    """Record that this worker is alive and what it consumes (one upsert)."""
    values: dict[str, Any] = {
        "name": name[:255],
        "queues": sorted(queues),
        "concurrency": concurrency,
        "pid": pid,
        "started_at": started_at,
        "heartbeat_at": utcnow(),
    }
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    insert = dialect.insert(WorkerRecord).values(**values)
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[WorkerRecord.name],
            set_={key: insert.excluded[key] for key in values if key != "name"},
        )
    )


def forget(*, session: Session, name: str | None = None) -> int:
    """Drop one worker's row (it stopped), or, without a name, rows silent for an hour."""
    query = delete(WorkerRecord)
    if name is not None:
        query = query.where(WorkerRecord.name == name)
    else:
        query = query.where(WorkerRecord.heartbeat_at < utcnow() - FORGET_AFTER)
    return int(session.execute(query).rowcount)  # type: ignore[attr-defined]


def live_workers(*, session: Session, max_age: float) -> list[WorkerRecord]:
    """Workers whose heartbeat is at most `max_age` seconds old, by name."""
    cutoff = utcnow() - timedelta(seconds=max_age)
    return list(
        session.scalars(
            select(WorkerRecord)
            .where(WorkerRecord.heartbeat_at >= cutoff)
            .order_by(WorkerRecord.name)
        )
    )


def running_by_worker(*, session: Session) -> dict[str, int]:
    """RUNNING tasks per worker node name (the record holds `node:pid`)."""
    counts: dict[str, int] = {}
    rows = session.execute(
        select(Task.worker, func.count())
        .where(Task.status == TaskStatus.RUNNING)
        .group_by(Task.worker)
    ).all()
    for worker, count in rows:
        node = (worker or "").rsplit(":", 1)[0]
        counts[node] = counts.get(node, 0) + int(count)
    return counts


@dataclass(frozen=True)
class QueueReport:
    name: str
    waiting: int
    oldest_seconds: float
    consumers: int

    @property
    def stranded(self) -> bool:
        """Work waits and no live worker consumes the queue."""
        return self.waiting > 0 and self.consumers == 0


def queue_report(*, session: Session, known: set[str], max_age: float) -> list[QueueReport]:
    """Per queue: tasks due and waiting, how long the oldest has waited, live consumers.

    Every known queue is listed, and any other queue that holds waiting tasks.
    """
    now = utcnow()
    rows = session.execute(
        select(Task.queue, func.count(), func.min(Task.run_after))
        .where(Task.status.in_(sorted(WAITING)), Task.run_after <= now)
        .group_by(Task.queue)
    ).all()
    waiting = {queue: (int(count), oldest) for queue, count, oldest in rows}
    consumers: dict[str, int] = {}
    for worker in live_workers(session=session, max_age=max_age):
        for queue in worker.queues:
            consumers[queue] = consumers.get(queue, 0) + 1
    reports = []
    for name in sorted(known | set(waiting)):
        count, oldest = waiting.get(name, (0, None))
        age = max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0
        reports.append(QueueReport(name, count, age, consumers.get(name, 0)))
    return reports
