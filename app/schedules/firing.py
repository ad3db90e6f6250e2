"""Firing: how a due schedule becomes tasks. Called by the dispatcher's every tick.

1. Take the due schedules (`next_fire_at <= now`, not paused: a range scan of ix_schedule_due),
   FOR UPDATE SKIP LOCKED on PostgreSQL, so several dispatchers share them and none waits.
2. For each, `slots.plan` says which slots to fire: the latest, or each one within the catch-up
   window; the others are skipped and counted. With overlap `skip`, a slot is skipped while the
   schedule's previous task is unfinished.
3. Each slot's task is made by the API's own submission code (`app.tasks.service.prepare`:
   payload validated, queue checked) and INSERTed with its (schedule_id, schedule_slot), whose
   unique index turns a second firing of a slot, whatever fired it, into nothing. The schedule
   advances to its next slot in the same transaction.
4. After the commit the new tasks are published as the API publishes its own (published_at set
   in the INSERT, unset again if the broker refused), so the outbox takes over on failure.

At the first tick the schedules declared in code (`@task_type(..., schedules=[...])`) are
synced: created, updated, or removed when gone from the code, by name, with owner "".
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from celery import Celery
from pydantic import ValidationError
from sqlalchemy import Table, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.core.config import ConfigError, Settings
from app.core.db import session_scope
from app.core.errors import AppError
from app.db.base import utcnow
from app.schedules import service
from app.schedules.models import ACTIVE, Catchup, Overlap, Schedule, Source
from app.schedules.schemas import ScheduleCreate
from app.schedules.slots import next_slot, plan
from app.tasks import service as task_service
from app.tasks.models import Task
from app.tasks.publication import row_doorbell, send_batch, unmark_published
from app.tasks.registry import all_task_types
from app.tasks.states import UNFINISHED

logger = logging.getLogger(__name__)

# Schedules taken per transaction, and slots fired per schedule per tick (the rest stay due).
BATCH = 100
SLOTS_PER_TICK = 1000
# Seconds between two looks for due schedules.
MIN_GAP = 0.2
# pg_advisory_xact_lock's key for the sync of code-declared schedules.
SYNC_LOCK = 0x7A5D5C4E

_TASKS = cast(Table, Task.__table__)


@dataclass
class Fired:
    fired: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Round:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


class Scheduler:
    """The dispatcher's firing step. Code-declared schedules are checked at construction (a bad
    one stops the dispatcher with one line) and synced at the first tick that reaches the
    database."""

    def __init__(
        self, *, settings: Settings, celery_app: Celery, lock: bool, min_gap: float = MIN_GAP
    ) -> None:
        self.settings = settings
        self.celery_app = celery_app
        self.lock = lock
        self.min_gap = min_gap
        self.declared = declared_schedules(extra_queues=settings.extra_queues)
        self._synced = False
        self._last = -min_gap

    def fire_due(self, *, now: datetime | None = None) -> Fired:
        result = Fired()
        # Under load the dispatcher ticks back to back (each outbox notification wakes it);
        # slots are a second apart at the closest, so a few looks a second are enough.
        started = time.monotonic()
        if started - self._last < self.min_gap:
            return result
        self._last = started
        try:
            if not self._synced:
                with session_scope() as session:
                    sync_declared(session=session, declared=self.declared, lock=self.lock)
                self._synced = True
            with session_scope() as session:
                round_ = fire(
                    session=session,
                    now=now or utcnow(),
                    lock=self.lock,
                    extra_queues=self.settings.extra_queues,
                )
        except Exception as exc:
            result.errors.append(f"schedules: {exc}")
            logger.warning("firing schedules failed", exc_info=True)
            return result
        result.fired, result.skipped = len(round_.rows), round_.skipped
        if round_.rows:
            self._publish(round_.rows, result)
        return result

    def _publish(self, rows: list[dict[str, Any]], result: Fired) -> None:
        bells = [row_doorbell(row, settings=self.settings) for row in rows]
        sent, error = send_batch(self.celery_app, bells)
        if error is None:
            return
        result.errors.append(f"publish: {error}")
        # Recorded as published in the INSERT: unmark, and the outbox sends them later.
        try:
            with session_scope() as session:
                for row in rows[sent:]:
                    unmark_published(session=session, task_id=row["id"], attempt=row["attempt"])
        except Exception:
            logger.warning("could not hand fired tasks to the outbox", exc_info=True)


def fire(*, session: Session, now: datetime, lock: bool, extra_queues: list[str]) -> _Round:
    """Fire every due schedule's slots (one batch) in the caller's transaction."""
    query = (
        select(Schedule)
        .where(text(ACTIVE), Schedule.next_fire_at <= now)
        .order_by(Schedule.next_fire_at)
        .limit(BATCH)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    round_ = _Round()
    for schedule in session.scalars(query):
        _fire_one(session, schedule, now=now, extra_queues=extra_queues, round_=round_)
    return round_


def _fire_one(
    session: Session, schedule: Schedule, *, now: datetime, extra_queues: list[str], round_: _Round
) -> None:
    timing = service.timing(schedule)
    slots = plan(
        timing,
        due=schedule.next_fire_at,
        now=now,
        latest_only=schedule.catchup == Catchup.LATEST,
        window=schedule.catchup_window_seconds,
        cap=SLOTS_PER_TICK,
    )
    skipped = slots.skipped
    busy = schedule.overlap == Overlap.SKIP and _unfinished(session, schedule.last_task_id)
    for slot in slots.fire:
        if busy:
            skipped += 1
            logger.info(
                "schedule slot skipped: its previous task is unfinished",
                extra={"schedule_id": str(schedule.id), "slot": slot.isoformat()},
            )
            continue
        row = _prepare(schedule, slot=slot, extra_queues=extra_queues)
        if row is None:
            skipped += 1
            continue
        if not _insert(session, row):
            # Another dispatcher (or an older copy of this one) fired this slot already.
            continue
        round_.rows.append(row)
        schedule.last_task_id, schedule.last_slot_at = row["id"], slot
        schedule.fired_count += 1
        busy = schedule.overlap == Overlap.SKIP
    if slots.skipped:
        logger.info(
            "missed schedule slots skipped by the catch-up policy",
            extra={"schedule_id": str(schedule.id), "count": slots.skipped},
        )
    schedule.skipped_count += skipped
    schedule.next_fire_at = slots.next_fire_at
    schedule.updated_at = now
    round_.skipped += skipped
    session.flush()


def _prepare(
    schedule: Schedule, *, slot: datetime, extra_queues: list[str]
) -> dict[str, Any] | None:
    """One slot's task, made as the API makes a submission (and marked published: it is sent
    right after the commit); None if the schedule no longer makes a valid task (its type or
    the type's input model changed since it was created)."""
    try:
        row = task_service.prepare(
            data=service.task_create(schedule),
            owner=schedule.owner,
            idempotency_key=None,
            extra_queues=extra_queues,
            publishing=True,
        )
    except AppError as exc:
        logger.error(
            "schedule makes no valid task; slot skipped",
            extra={"schedule_id": str(schedule.id), "reason": exc.message},
        )
        return None
    row["schedule_id"], row["schedule_slot"] = schedule.id, slot
    return row


def _insert(session: Session, row: dict[str, Any]) -> bool:
    """False if the slot has its task already: the unique (schedule_id, schedule_slot)."""
    return session.execute(_insert_once(session), row).first() is not None


def _insert_once(session: Session) -> Any:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(_TASKS)
        .on_conflict_do_nothing(
            index_elements=["schedule_id", "schedule_slot"],
            index_where=_TASKS.c.schedule_id.is_not(None),  # the index is partial
        )
        .returning(_TASKS.c.id)
    )


def _unfinished(session: Session, task_id: uuid.UUID | None) -> bool:
    if task_id is None:
        return False
    status = session.scalar(select(Task.status).where(Task.id == task_id))
    return status is not None and status in UNFINISHED


# Code-declared schedules.


def declared_schedules(*, extra_queues: list[str]) -> dict[str, ScheduleCreate]:
    """Every schedule declared next to a loaded task type, checked; a bad one is a ConfigError."""
    declared: dict[str, ScheduleCreate] = {}
    for task_type in all_task_types():
        for spec in task_type.schedules:
            where = f"schedule {spec.name!r} of task type {task_type.name!r}"
            if spec.name in declared:
                raise ConfigError(f"invalid configuration: {where} is declared twice")
            try:
                data = ScheduleCreate.model_validate(
                    {**vars(spec), "type": task_type.name, "name": spec.name}
                )
                service.check(data.model_dump(), extra_queues=extra_queues)
            except AppError as exc:
                raise ConfigError(f"invalid configuration: {where}: {exc.message}") from None
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(part) for part in error['loc'])}: "
                    + str(error["msg"]).removeprefix("Value error, ")
                    for error in exc.errors()
                )
                raise ConfigError(f"invalid configuration: {where}: {problems}") from None
            declared[spec.name] = data
    return declared


def sync_declared(*, session: Session, declared: dict[str, ScheduleCreate], lock: bool) -> None:
    """Make the database's code-declared schedules (owner "") those of the code."""
    if lock:
        # Dispatchers starting together would each create the same schedule.
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SYNC_LOCK})
    existing = {
        row.name: row
        for row in session.scalars(
            select(Schedule).where(
                Schedule.owner == "",
                (Schedule.source == Source.CODE.value) | Schedule.name.in_(list(declared)),
            )
        )
    }
    now = utcnow()
    for name, data in declared.items():
        row = existing.pop(name, None)
        if row is None:
            service.create(
                session=session, data=data, owner="", extra_queues=[], source=Source.CODE
            )
            logger.info("declared schedule created", extra={"schedule": name})
            continue
        wanted = data.model_dump(include=set(service.DEFINITION))
        if row.source == Source.CODE.value and all(
            getattr(row, key) == value for key, value in wanted.items()
        ):
            continue
        retimed = any(getattr(row, key) != wanted[key] for key in service.TIMING)
        for key, value in wanted.items():
            setattr(row, key, value)
        row.source = Source.CODE.value
        if retimed:
            row.anchor_at = now.replace(microsecond=0)
            row.next_fire_at = next_slot(service.timing(row), after=now)
        row.updated_at = now
        logger.info("declared schedule updated", extra={"schedule": name})
    known = {task_type.name for task_type in all_task_types()}
    for gone, row in existing.items():
        if row.type not in known:
            # This process does not load the type's module: another dispatcher may, and the
            # schedule is not this one's to judge.
            logger.warning(
                "declared schedule of a task type not loaded here; left as it is",
                extra={"schedule": gone, "type": row.type},
            )
            continue
        session.delete(row)
        logger.info("declared schedule removed from the code; deleted", extra={"schedule": gone})
    session.flush()
