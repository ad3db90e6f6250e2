"""Retention: finished records are deleted once they are old enough. The map:

- **What expires.** Only a record in a final status (SUCCEEDED, FAILED, CANCELLED; see
  `app.tasks.states.TERMINAL`) whose `finished_at` is older than its period: the status's
  setting (`TASKDOCK_RETENTION_SUCCEEDED_SECONDS` and its two siblings; `0` keeps forever), or
  its task type's own (`@task_type(..., retention={"SUCCEEDED": timedelta(hours=1)})`).
  `rules()` turns both into one list; a record of a type this process has not loaded follows
  the settings. An unfinished record is never chosen: every statement filters on a final
  status, and a retried task (`POST /retry`) has left its final status and lost `finished_at`.
- **What goes with it.** The record's runs, deleted by the batch's own transaction right after
  their tasks (`task_run` has no foreign key: migration 0015), and its webhook deliveries, by
  their foreign key's ON DELETE CASCADE; SQLite enforces it too (`PRAGMA foreign_keys=ON`,
  app.core.db). An idempotency key is remembered exactly as long as its record.
- **How.** `purge()` deletes by batches of `TASKDOCK_RETENTION_BATCH_SIZE` ids, oldest first,
  each batch its own short transaction, so no lock is held for long and the API and workers
  never wait behind a purge. On PostgreSQL a batch is chosen `FOR UPDATE SKIP LOCKED`: several
  dispatchers share the work, and a row a cancel or retry holds is left for the next look. The
  scan reads only `ix_task_finished` (status, finished_at; finished rows only, migration 0009).
- **Who.** The dispatcher's tick calls `Retention.tick()`: a purge every
  `TASKDOCK_RETENTION_INTERVAL` seconds, each tick deleting for at most `SLICE_SECONDS` so the
  outbox keeps its pace; a purge with more left goes on at the next tick. `taskdock purge`
  runs one to the end, or counts with `--dry-run`. Each deleted record counts in
  `taskdock_tasks_purged_total{status}`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Engine, Select, Table, delete, func, select
from sqlalchemy.sql.dml import ReturningDelete

from app.core import metrics
from app.core.config import Settings
from app.db.base import utcnow
from app.tasks.models import Task, TaskRun
from app.tasks.registry import all_task_types
from app.tasks.states import TERMINAL, TaskStatus

logger = logging.getLogger(__name__)

# A tick's share of purging: the dispatcher's outbox waits while it deletes.
SLICE_SECONDS = 0.25

_table = cast(Table, Task.__table__)
_c = _table.c
_runs = cast(Table, TaskRun.__table__)


@dataclass(frozen=True)
class Rule:
    """Records of `status` finished more than `seconds` ago expire: of `type`, or, when `type` is
    None, of every type but `others` (the types with a period of their own for `status`)."""

    status: TaskStatus
    seconds: float
    type: str | None = None
    others: tuple[str, ...] = ()

    def where(self, now: datetime) -> list[Any]:
        conditions = [
            _c.status == self.status,
            _c.finished_at < now - timedelta(seconds=self.seconds),
        ]
        if self.type is not None:
            conditions.append(_c.type == self.type)
        elif self.others:
            conditions.append(_c.type.not_in(self.others))
        return conditions


def default_periods(settings: Settings) -> dict[TaskStatus, float]:
    """The settings' period per final status, in seconds (0: kept forever)."""
    return {
        TaskStatus.SUCCEEDED: settings.retention_succeeded_seconds,
        TaskStatus.FAILED: settings.retention_failed_seconds,
        TaskStatus.CANCELLED: settings.retention_cancelled_seconds,
    }


def rules(*, settings: Settings) -> list[Rule]:
    """Every period in force: the settings' and the loaded task types' own."""
    found: list[Rule] = []
    defaults = default_periods(settings)
    for status in sorted(TERMINAL):
        own = {
            task.name: task.retention[status]
            for task in all_task_types()
            if status in task.retention
        }
        if defaults[status] > 0:
            found.append(Rule(status, defaults[status], others=tuple(sorted(own))))
        found.extend(Rule(status, seconds, type=name) for name, seconds in own.items() if seconds)
    return found


def _batch(rule: Rule, *, now: datetime, size: int, lock: bool) -> ReturningDelete[Any]:
    chosen: Select[Any] = select(_c.id).where(*rule.where(now)).order_by(_c.finished_at).limit(size)
    if lock:
        chosen = chosen.with_for_update(skip_locked=True)
    # The status again on the DELETE itself: on SQLite nothing locks the chosen rows.
    return (
        delete(_table)
        .where(_c.id.in_(chosen.scalar_subquery()), _c.status == rule.status)
        .returning(_c.id)
    )


def _delete_batch(connection: Connection, statement: ReturningDelete[Any]) -> int:
    """One batch: its tasks, then the runs of exactly those tasks (a task that left its final
    status meanwhile keeps both), in the caller's transaction."""
    deleted = list(connection.scalars(statement))
    if deleted:
        connection.execute(delete(_runs).where(_runs.c.task_id.in_(deleted)))
    return len(deleted)


@dataclass
class Purged:
    """What one purge (or one tick's share of it) deleted, or would delete (`dry_run`)."""

    counts: dict[TaskStatus, int] = field(default_factory=dict)
    more: bool = False  # stopped by its deadline with expired records left
    error: str | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def purge(
    *,
    engine: Engine,
    settings: Settings,
    lock: bool,
    deadline: float | None = None,
    dry_run: bool = False,
) -> Purged:
    """Delete every expired record, a batch per transaction, until none is left or the
    monotonic `deadline` has passed (then `more` is true). `dry_run` only counts them."""
    now = utcnow()
    purged = Purged(counts=dict.fromkeys(sorted(TERMINAL), 0))
    for rule in rules(settings=settings):
        if dry_run:
            with engine.connect() as connection:
                count = connection.scalar(select(func.count()).where(*rule.where(now)))
            purged.counts[rule.status] += int(count or 0)
            continue
        statement = _batch(rule, now=now, size=settings.retention_batch_size, lock=lock)
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                purged.more = True
                return purged
            with engine.begin() as connection:
                deleted = _delete_batch(connection, statement)
            if deleted:
                purged.counts[rule.status] += deleted
                metrics.TASKS_PURGED.labels(rule.status.value).inc(deleted)
            if deleted < settings.retention_batch_size:
                break
    return purged


class Retention:
    """The dispatcher's share of retention: a purge every TASKDOCK_RETENTION_INTERVAL seconds,
    a slice of it per tick."""

    def __init__(self, *, settings: Settings, engine: Engine, lock: bool) -> None:
        self.settings = settings
        self.engine = engine
        self.lock = lock
        self._due = 0.0  # monotonic: the first tick purges

    def tick(self) -> Purged | None:
        """Purge for at most SLICE_SECONDS when due; None when not due."""
        started = time.monotonic()
        if started < self._due:
            return None
        try:
            purged = purge(
                engine=self.engine,
                settings=self.settings,
                lock=self.lock,
                deadline=started + SLICE_SECONDS,
            )
        except Exception as exc:
            logger.warning("retention purge failed", exc_info=True)
            self._due = started + self.settings.retention_interval
            return Purged(error=str(exc).splitlines()[0][:200] if str(exc) else repr(exc))
        # More left: go on at the next tick, after the outbox has had its turn.
        self._due = started if purged.more else started + self.settings.retention_interval
        if purged.total:
            logger.info(
                "expired task records deleted",
                extra={"deleted": {s.value: n for s, n in purged.counts.items()}},
            )
        return purged
