"""The console's schedules page: list, create, pause, resume and delete.

Each action calls app.schedules.service as /api/v1/schedules does, with the same scope, owner
filter, validation (the type's input model, cron, time zone, queue) and address guard for
`notify_url`; a refused definition comes back as the form with the error at its field.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.auth.dependencies import owner_filter
from app.auth.service import Scope
from app.console.mount import PREFIX
from app.console.router import (
    ConsoleRoute,
    SessionDep,
    allow,
    checked_form,
    database,
    page,
    when,
)
from app.console.session import Session
from app.core.errors import InvalidInput, field_errors
from app.schedules import service
from app.schedules.exceptions import ScheduleNameTaken
from app.schedules.models import Catchup, Overlap, Schedule
from app.schedules.schemas import ScheduleCreate
from app.tasks.registry import all_task_types
from app.webhooks.service import check_notify_url

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

LIMIT = 500
FIELDS = (
    "name",
    "type",
    "payload",
    "cron",
    "timezone",
    "interval_seconds",
    "queue",
    "priority",
    "overlap",
    "catchup",
    "catchup_window_seconds",
    "notify_url",
)
DEFAULTS = {
    "payload": "{}",
    "timezone": "UTC",
    "priority": "0",
    "overlap": Overlap.ALLOW.value,
    "catchup": Catchup.LATEST.value,
    "catchup_window_seconds": "3600",
}


def schedule_view(schedule: Schedule) -> dict[str, Any]:
    timing = (
        f"{schedule.cron} ({schedule.timezone})"
        if schedule.cron
        else f"every {schedule.interval_seconds} s"
    )
    return {
        "id": str(schedule.id),
        "name": schedule.name or "-",
        "type": schedule.type,
        "timing": timing,
        "policies": f"overlap {schedule.overlap}, catch-up {schedule.catchup}",
        "paused": schedule.paused,
        "next": when(schedule.next_fire_at) if not schedule.paused else "paused",
        "last": when(schedule.last_slot_at),
        "last_task": str(schedule.last_task_id) if schedule.last_task_id else None,
        "counts": f"{schedule.fired_count} / {schedule.skipped_count}",
        "source": schedule.source,
    }


async def schedules_page(
    request: Request,
    session: Session,
    *,
    values: dict[str, str],
    errors: dict[str, str],
    status: int = 200,
) -> Response:
    found = await database(request).autocommit(
        service.list_schedules, owner=owner_filter(session.principal), limit=LIMIT
    )
    response = page(
        request,
        "schedules.html",
        session,
        schedules=[schedule_view(item) for item in found],
        limited=len(found) == LIMIT,
        values=values,
        errors=errors,
        types=[t.name for t in all_task_types()],
        overlaps=[o.value for o in Overlap],
        catchups=[c.value for c in Catchup],
        can_submit=session.principal.allows(Scope.SUBMIT),
    )
    response.status_code = status
    return response


@router.get("/schedules")
async def schedules(request: Request, session: SessionDep) -> Response:
    await allow(request, session, Scope.READ, "read")
    return await schedules_page(request, session, values=dict(DEFAULTS), errors={})


def _number(text: str) -> int | str | None:
    text = text.strip()
    if not text:
        return None
    return int(text) if text.lstrip("-").isdigit() else text  # the model names a bad one


def definition(form: dict[str, str]) -> dict[str, Any]:
    """The API's ScheduleCreate body from the form's text; bad JSON is named at `payload`."""
    try:
        payload = json.loads(form.get("payload") or "{}")
    except ValueError as exc:
        raise InvalidInput(
            f"payload: not JSON ({exc})",
            fields=[{"loc": ["body", "payload"], "msg": f"not JSON: {exc}", "type": "json"}],
        ) from None
    values: dict[str, Any] = {
        "type": form.get("type", ""),
        "payload": payload,
        "timezone": form.get("timezone") or "UTC",
        "overlap": form.get("overlap") or Overlap.ALLOW.value,
        "catchup": form.get("catchup") or Catchup.LATEST.value,
    }
    for name in ("name", "cron", "queue", "notify_url"):
        values[name] = form.get(name) or None
    for name in ("interval_seconds", "priority", "catchup_window_seconds"):
        number = _number(form.get(name, ""))
        if number is not None:
            values[name] = number
    return values


def field_of(loc: list[Any]) -> str:
    """The form field an error belongs to: a payload's inner field is the payload's."""
    parts = [str(part) for part in loc if part != "body"]
    return parts[0] if parts else "form"


@router.post("/schedules")
async def create(request: Request, session: SessionDep) -> Response:
    form = await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    values = {name: form.get(name, "")[:10_000] for name in FIELDS}
    errors: dict[str, str] = {}
    settings = request.app.state.settings
    try:
        data = ScheduleCreate.model_validate(definition(values))
        if data.notify_url is not None:
            await check_notify_url(url=data.notify_url, settings=settings)
        await database(request).transaction(
            service.create, data=data, owner=principal.owner, extra_queues=settings.extra_queues
        )
    except ValidationError as exc:
        for error in field_errors(exc.errors()):
            errors.setdefault(field_of(error["loc"]), error["msg"])
    except InvalidInput as exc:
        for error in exc.details.get("fields") or []:
            errors.setdefault(field_of(error["loc"]), error["msg"])
        if not errors:
            errors["form"] = exc.message
    except ScheduleNameTaken as exc:
        errors["name"] = exc.message
    if errors:
        return await schedules_page(request, session, values=values, errors=errors, status=422)
    return RedirectResponse(f"{PREFIX}/schedules", status_code=303)


async def change(
    request: Request, session: Session, schedule_id: uuid.UUID, action: Callable[..., Any]
) -> Response:
    await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    await database(request).transaction(
        action, schedule_id=schedule_id, owner=owner_filter(principal)
    )
    return RedirectResponse(f"{PREFIX}/schedules", status_code=303)


@router.post("/schedules/{schedule_id}/pause")
async def pause(request: Request, session: SessionDep, schedule_id: uuid.UUID) -> Response:
    return await change(request, session, schedule_id, service.pause)


@router.post("/schedules/{schedule_id}/resume")
async def resume(request: Request, session: SessionDep, schedule_id: uuid.UUID) -> Response:
    return await change(request, session, schedule_id, service.resume)


@router.post("/schedules/{schedule_id}/delete")
async def delete(request: Request, session: SessionDep, schedule_id: uuid.UUID) -> Response:
    return await change(request, session, schedule_id, service.delete)
