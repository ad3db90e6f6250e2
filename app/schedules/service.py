"""Schedules on the API side and the operators' CLI: create, read, list, change, pause, resume,
delete. Callers commit. Firing is app/schedules/firing.py's."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import InvalidInput
from app.db.base import utcnow
from app.schedules.exceptions import ScheduleNameTaken, ScheduleNotFound
from app.schedules.models import Schedule, Source
from app.schedules.schemas import ScheduleCreate, ScheduleUpdate
from app.schedules.slots import Timing, next_slot
from app.tasks import service as task_service
from app.tasks.schemas import TaskCreate

# What defines when and what a schedule fires; `name` and `paused` are not part of it.
DEFINITION = (
    "type",
    "payload",
    "queue",
    "priority",
    "cron",
    "timezone",
    "interval_seconds",
    "overlap",
    "catchup",
    "catchup_window_seconds",
    "notify_url",
)
TIMING = ("cron", "timezone", "interval_seconds")


def _fields(schedule: Schedule | dict[str, Any]) -> dict[str, Any]:
    if isinstance(schedule, dict):
        return schedule
    return {key: getattr(schedule, key) for key in (*DEFINITION, "anchor_at")}


def task_create(schedule: Schedule | dict[str, Any]) -> TaskCreate:
    """The submission a schedule makes at each slot."""
    values = _fields(schedule)
    return TaskCreate(
        type=values["type"],
        payload=values["payload"],
        queue=values["queue"],
        priority=values["priority"],
        notify_url=values["notify_url"],
    )


def timing(schedule: Schedule | dict[str, Any]) -> Timing:
    values = _fields(schedule)
    return Timing(
        cron=values["cron"],
        timezone=values["timezone"],
        interval_seconds=values["interval_seconds"],
        anchor=values["anchor_at"],
    )


def check(values: dict[str, Any], *, extra_queues: list[str]) -> None:
    """A definition as the API would submit its tasks: one of cron and interval, a known type,
    a payload its input model accepts, a known queue. InvalidInput (422) names the field."""
    has_cron, has_interval = values["cron"] is not None, values["interval_seconds"] is not None
    if has_cron == has_interval:
        message = (
            "give cron or interval_seconds, not both"
            if has_cron
            else "give cron (with timezone) or interval_seconds"
        )
        fields = [
            {"loc": ["body", name], "msg": message, "type": "value_error"}
            for name in ("cron", "interval_seconds")
        ]
        raise InvalidInput(message, fields=fields)
    # The same checks, and the same error locations, as POST /api/v1/tasks.
    task_service.prepare(
        data=task_create(values), owner="", idempotency_key=None, extra_queues=extra_queues
    )


def create(
    *,
    session: Session,
    data: ScheduleCreate,
    owner: str,
    extra_queues: list[str],
    source: Source = Source.API,
) -> Schedule:
    values = data.model_dump()
    check(values, extra_queues=extra_queues)
    now = utcnow()
    # Interval slots fall on whole seconds from now on.
    values["anchor_at"] = now.replace(microsecond=0)
    schedule = Schedule(
        id=uuid.uuid4(),
        owner=owner,
        source=source.value,
        next_fire_at=next_slot(timing(values), after=now),
        fired_count=0,
        skipped_count=0,
        created_at=now,
        updated_at=now,
        **values,
    )
    session.add(schedule)
    _flush(session, name=data.name)
    return schedule


def get(*, session: Session, schedule_id: uuid.UUID, owner: str | None) -> Schedule:
    """A schedule by id; another owner's is as absent as an unknown one (None: any owner)."""
    query = select(Schedule).where(Schedule.id == schedule_id)
    if owner is not None:
        query = query.where(Schedule.owner == owner)
    schedule = session.scalars(query).one_or_none()
    if schedule is None:
        raise ScheduleNotFound(f"schedule {schedule_id} not found")
    return schedule


def find(*, session: Session, ref: str) -> Schedule:
    """A schedule by id or by name (operators: any owner; a name must be unambiguous)."""
    try:
        return get(session=session, schedule_id=uuid.UUID(ref), owner=None)
    except ValueError:
        pass
    found = list(session.scalars(select(Schedule).where(Schedule.name == ref).limit(2)))
    if len(found) != 1:
        raise ScheduleNotFound(
            f"no schedule named {ref!r}" if not found else f"several schedules are named {ref!r}"
        )
    return found[0]


def list_schedules(*, session: Session, owner: str | None, limit: int) -> list[Schedule]:
    """Oldest first."""
    query = select(Schedule)
    if owner is not None:
        query = query.where(Schedule.owner == owner)
    return list(session.scalars(query.order_by(Schedule.created_at, Schedule.id).limit(limit)))


def update(
    *,
    session: Session,
    schedule_id: uuid.UUID,
    owner: str | None,
    data: ScheduleUpdate,
    extra_queues: list[str],
) -> Schedule:
    schedule = get(session=session, schedule_id=schedule_id, owner=owner)
    given = data.model_dump(include=data.model_fields_set)
    for required in ("type", "payload", "priority", "timezone", "overlap", "catchup"):
        if required in given and given[required] is None:
            raise InvalidInput(
                f"{required} cannot be null",
                fields=[{"loc": ["body", required], "msg": "may not be null", "type": "null"}],
            )
    if "catchup_window_seconds" in given and given["catchup_window_seconds"] is None:
        del given["catchup_window_seconds"]
    values = {name: getattr(schedule, name) for name in DEFINITION} | {
        name: value for name, value in given.items() if name in DEFINITION
    }
    check(values, extra_queues=extra_queues)
    now = utcnow()
    retimed = any(values[name] != getattr(schedule, name) for name in TIMING)
    for name, value in values.items():
        setattr(schedule, name, value)
    if "name" in given:
        schedule.name = given["name"]
    if retimed:
        schedule.anchor_at = now.replace(microsecond=0)
    if given.get("paused") is not None:
        _set_paused(schedule, given["paused"], now=now, retimed=retimed)
    elif retimed:
        schedule.next_fire_at = next_slot(timing(schedule), after=now)
    schedule.updated_at = now
    _flush(session, name=schedule.name)
    return schedule


def pause(*, session: Session, schedule_id: uuid.UUID, owner: str | None) -> Schedule:
    schedule = get(session=session, schedule_id=schedule_id, owner=owner)
    _set_paused(schedule, True, now=utcnow())
    session.flush()
    return schedule


def resume(*, session: Session, schedule_id: uuid.UUID, owner: str | None) -> Schedule:
    schedule = get(session=session, schedule_id=schedule_id, owner=owner)
    _set_paused(schedule, False, now=utcnow())
    session.flush()
    return schedule


def _set_paused(schedule: Schedule, paused: bool, *, now: datetime, retimed: bool = False) -> None:
    # Slots that passed while paused are not owed: a resumed schedule starts from now.
    if (schedule.paused and not paused) or retimed:
        schedule.next_fire_at = next_slot(timing(schedule), after=now)
    schedule.paused = paused
    schedule.updated_at = now


def delete(*, session: Session, schedule_id: uuid.UUID, owner: str | None) -> None:
    """Its tasks stay, with their schedule_id set to null by the foreign key."""
    session.delete(get(session=session, schedule_id=schedule_id, owner=owner))
    session.flush()


def _flush(session: Session, *, name: str | None) -> None:
    try:
        session.flush()
    except IntegrityError as exc:
        if name is not None and "name" in str(exc.orig):
            raise ScheduleNameTaken(
                f"a schedule named {name!r} already exists for this API key"
            ) from None
        raise
