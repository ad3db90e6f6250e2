"""The console's pages, the JSON their script reads for live updates, and the event stream that
tells it when (the map: app/console/__init__.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlencode

import jinja2
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app.api.deps import Database, client_address
from app.api.middleware import current_request_id
from app.auth import service as auth_service
from app.auth.dependencies import owner_filter
from app.auth.exceptions import MissingScope
from app.auth.service import Principal, Scope
from app.console import queries
from app.console.forms import fields_of, payload_of
from app.console.mount import PREFIX
from app.console.session import (
    LOGIN_COOKIE,
    SECURITY_HEADERS,
    LoginRequired,
    Session,
    Sessions,
    check_csrf,
)
from app.core import metrics
from app.core.errors import AppError, InvalidInput, field_errors
from app.tasks import events, service
from app.tasks.publication import Submitter
from app.tasks.registry import all_task_types, get_task_type, known_queues
from app.tasks.router import stream_start
from app.tasks.schemas import TaskCreate, TaskRead, TaskRunRead
from app.tasks.states import UNFINISHED, TaskStatus
from app.webhooks.schemas import DeliveryRead

HERE = Path(__file__).parent
# Autoescape on every template (the .svg too, which select_autoescape's default would skip).
templates = Jinja2Templates(
    env=jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, auto_reload=False
    )
)
STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
PAGE_SIZE = 50
RETRYABLE = ("FAILED", "CANCELLED")
NONE = "-"


def when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") + "Z" if value else NONE


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)


templates.env.filters["when"] = when
templates.env.filters["pretty"] = pretty


class ConsoleRoute(APIRoute):
    """Security headers on every answer; the app's errors as pages; login when needed."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                response = RedirectResponse(f"{PREFIX}/login", status_code=303)
            except AppError as exc:
                response = error_page(request, exc.status_code, exc.message)
                response.headers.update(exc.headers)
            except RequestValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in field_errors(exc.errors())
                )
                response = error_page(request, 422, problems)
            csrf = getattr(request.state, "console_issue", None)
            if csrf is not None:
                # Auth is off: every browser gets a session (for its CSRF token) on first sight.
                sessions(request).issue(response, request, key_id="", csrf=csrf)
            response.headers.update(SECURITY_HEADERS)
            return response

        return route


router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)


def error_page(request: Request, status: int, message: str) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {"status": status, "message": message, "session": None},
        status_code=status,
    )


def sessions(request: Request) -> Sessions:
    found: Sessions = request.app.state.console_sessions
    return found


async def current(request: Request) -> Session:
    """The session's principal; with auth off, a fresh session when the browser has none."""
    store = sessions(request)
    found = await store.load(request)
    if found is not None:
        return found
    if not store.auth:
        csrf = store.new_csrf()
        request.state.console_issue = csrf
        return Session(principal=auth_service.ANONYMOUS, csrf=csrf)
    raise LoginRequired()


SessionDep = Annotated[Session, Depends(current)]


async def allow(request: Request, session: Session, scope: Scope, limit: str) -> Principal:
    """As the API's `access`: the scope, then the key's rate limit."""
    principal = session.principal
    if not principal.allows(scope):
        raise MissingScope(f"this API key lacks the {scope.value!r} scope", scope=scope.value)
    identity = f"key:{principal.owner}" if principal.owner else f"ip:{client_address(request)}"
    await request.app.state.rate_limiter.hit(limit, identity)
    return principal


async def form_of(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {key: values[0] for key, values in parse_qs(body, keep_blank_values=True).items()}


async def checked_form(request: Request, session: Session) -> dict[str, str]:
    form = await form_of(request)
    check_csrf(session, form.get("csrf"))
    return form


def database(request: Request) -> Database:
    found: Database = request.app.state.database
    return found


def page(request: Request, name: str, session: Session, **context: Any) -> Response:
    context.update(session=session, auth=sessions(request).auth)
    return templates.TemplateResponse(request, name, context)


# Static files


@router.get("/static/{name}")
async def static(name: str) -> Response:
    if name not in STATIC:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(static_file(name), media_type=STATIC[name])


@cache
def static_file(name: str) -> bytes:
    return (HERE / "static" / name).read_bytes()


# Login and logout


@router.get("/login")
async def login_form(request: Request) -> Response:
    if not sessions(request).auth:
        return RedirectResponse(PREFIX, status_code=303)
    return login_page(request, error=None, status=200)


def login_page(request: Request, *, error: str | None, status: int) -> Response:
    store = sessions(request)
    nonce, token = store.login_token()
    response = templates.TemplateResponse(
        request,
        "login.html",
        {"error": error, "session": None, "token": token},
        status_code=status,
    )
    store.login_cookie(response, request, nonce)
    return response


@router.post("/login")
async def login(request: Request) -> Response:
    store = sessions(request)
    if not store.auth:
        return RedirectResponse(PREFIX, status_code=303)
    form = await form_of(request)
    store.check_login_token(request, form.get("token", ""))
    plain = form.get("api_key", "").strip()
    principal = None
    if plain:
        principal = await database(request).autocommit(auth_service.authenticate, plain=plain)
    if principal is None:
        # Counted as on the API: guessing keys through the console gets 429 too.
        await request.app.state.rate_limiter.hit("auth_failures", f"ip:{client_address(request)}")
        return login_page(request, error="That API key is unknown or revoked.", status=401)
    response = RedirectResponse(PREFIX, status_code=303)
    store.issue(response, request, key_id=principal.owner)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


@router.post("/logout")
async def logout(request: Request, session: SessionDep) -> Response:
    await checked_form(request, session)
    response = RedirectResponse(f"{PREFIX}/login", status_code=303)
    sessions(request).end(response)
    return response


# Overview


async def read_overview(request: Request, principal: Principal) -> queries.Overview:
    settings = request.app.state.settings
    result: queries.Overview = await database(request).autocommit(
        queries.overview,
        owner=owner_filter(principal),
        known_queues=known_queues(settings.extra_queues),
        heartbeat_max_age=settings.worker_heartbeat_max_age,
        dispatcher_lag=max(
            10.0, 5 * settings.dispatcher_interval + settings.dispatch_grace_seconds
        ),
    )
    return result


@router.get("")
async def overview(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    view = await read_overview(request, principal)
    return page(
        request,
        "overview.html",
        session,
        view=view,
        statuses=list(TaskStatus),
        events_url=f"{PREFIX}/events",
    )


@router.get("/")
async def overview_slash() -> Response:
    return RedirectResponse(PREFIX, status_code=307)


def overview_live(view: queries.Overview) -> dict[str, str]:
    values = {f"status:{s.value}": str(count) for s, count in view.statuses.items()}
    values["outbox"] = str(view.outbox)
    values["outbox-oldest"] = f"{view.outbox_oldest_seconds:.0f} s"
    values["dispatcher"] = "ok" if view.dispatcher_ok else "lagging"
    values["workers"] = str(len(view.workers))
    for queue in view.queues:
        values[f"queue:{queue.name}:waiting"] = str(queue.waiting)
        values[f"queue:{queue.name}:oldest"] = f"{queue.oldest_seconds:.0f} s"
        values[f"queue:{queue.name}:consumers"] = str(queue.consumers)
    for worker in view.workers:
        values[f"worker:{worker.name}:heartbeat"] = when(worker.heartbeat_at)
    return values


@router.get("/live/overview")
async def live_overview(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    return JSONResponse(overview_live(await read_overview(request, principal)))


@router.get("/chart.svg")
async def chart(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    series = await database(request).autocommit(
        queries.chart, owner=owner_filter(principal), kept=chart_minutes(request)
    )
    body = templates.get_template("chart.svg").render(**chart_geometry(series))
    return Response(body, media_type="image/svg+xml")


def chart_minutes(request: Request) -> queries.ChartMinutes:
    found: queries.ChartMinutes = request.app.state.chart_minutes
    return found


def chart_geometry(series: list[tuple[int, int]]) -> dict[str, Any]:
    """Bars per minute, succeeded stacked under failed, scaled to the busiest minute."""
    height, width = 120, 6
    peak = max([ok + failed for ok, failed in series] + [1])
    bars = []
    for index, (ok, failed) in enumerate(series):
        ok_h = round(ok * height / peak)
        failed_h = round(failed * height / peak)
        bars.append(
            {
                "x": index * (width + 2),
                "ok_y": height - ok_h,
                "ok_h": ok_h,
                "failed_y": height - ok_h - failed_h,
                "failed_h": failed_h,
                "title": f"{ok} succeeded, {failed} failed",
            }
        )
    return {
        "bars": bars,
        "width": len(series) * (width + 2),
        "height": height,
        "bar_width": width,
        "peak": peak,
        "succeeded": sum(ok for ok, _ in series),
        "failed": sum(failed for _, failed in series),
    }


# Tables: one row shape for the page and for its live updates. A row is
# {"data": {name: value}, "cells": [cell]}, a cell {"text": ...} with an optional "href" (a
# link), "status" (coloured by the stylesheet) or "class"; templates/rows.html and console.js
# lay it out the same way, text always as text.

Cell = dict[str, str]


def table_row(cells: list[Cell], **data: str) -> dict[str, Any]:
    return {"data": data, "cells": cells}


def text(value: Any) -> Cell:
    return {"text": NONE if value is None or value == "" else str(value)}


def status_cell(value: str) -> Cell:
    return {"text": value, "status": value}


def task_row(row: Any) -> dict[str, Any]:
    return table_row(
        [
            {
                "text": str(row.id)[:12] + "\u2026",
                "href": f"{PREFIX}/tasks/{row.id}",
                "class": "mono",
            },
            text(row.type),
            status_cell(row.status.value),
            text(row.queue),
            text(f"{row.attempt}/{row.max_attempts}"),
            {"text": row.idempotency_key or ""},
            text(when(row.created_at)),
            text(when(row.finished_at)),
        ],
        task=str(row.id),
    )


def run_row(run: TaskRunRead) -> dict[str, Any]:
    error = f"{run.error.type}: {run.error.message}" if run.error else None
    duration = f"{run.duration:.3f} s" if run.duration is not None else None
    return table_row(
        [
            text(f"{run.attempt}.{run.delivery}"),
            status_cell(run.outcome.value),
            text(run.worker),
            text(when(run.started_at)),
            text(when(run.finished_at) if run.finished_at else None),
            text(duration),
            text(error),
        ],
        run=f"{run.attempt}.{run.delivery}",
    )


def delivery_row(delivery: DeliveryRead) -> dict[str, Any]:
    return table_row(
        [
            text(delivery.attempt),
            text(delivery.url),
            status_cell(delivery.status.value),
            text(delivery.attempts),
            text(delivery.last_status_code),
            text(delivery.last_error),
            text(when(delivery.next_attempt_at) if delivery.next_attempt_at else None),
            text(when(delivery.delivered_at) if delivery.delivered_at else None),
        ],
        delivery=delivery.webhook_id,
    )


# The event stream the pages follow: each change of a task the key may see wakes the page,
# which then reads its live values again (the event says that something changed; the
# page's JSON says what it now shows, with the same owner filter and bounds as the page).


@router.get("/events", response_class=EventSourceResponse)
async def console_events(
    request: Request,
    session: SessionDep,
    after: Annotated[int, Depends(stream_start)],
    task_id: uuid.UUID | None = None,
) -> AsyncIterator[ServerSentEvent]:
    principal = await allow(request, session, Scope.READ, "read")
    where = events.EventFilter(
        owner=owner_filter(principal),
        task_ids=frozenset([task_id] if task_id else ()),
        types=frozenset(),
        statuses=frozenset(),
    )
    async for event in events.stream(
        hub=request.app.state.events,
        where=where,
        after=after,
        heartbeat=request.app.state.settings.events_heartbeat_seconds,
    ):
        yield event


# Tasks


def parse_time(name: str, text: str) -> datetime | None:
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"{name}: not a date and time",
            fields=[{"loc": ["query", name], "msg": "not a date and time", "type": "value"}],
        ) from None
    # The form's inputs carry no zone: the console shows UTC, so it reads UTC.
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# The list's filters a bulk action takes too (app.tasks.schemas.BulkAction).
BULK_FILTERS = ("status", "type", "queue", "from", "to")


def bulk_filters(raw: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in raw.items() if key in BULK_FILTERS}


def filters_of(request: Request) -> queries.TaskFilters:
    params = request.query_params
    names = ("status", "type", "queue", "from", "to", "idempotency_key", "request_id", "contains")
    raw = {name: params.get(name, "")[:500] for name in names}
    status = None
    if raw["status"]:
        try:
            status = TaskStatus(raw["status"])
        except ValueError:
            raise InvalidInput(f"unknown status {raw['status']!r}") from None
    return queries.TaskFilters(
        status=status,
        type=raw["type"] or None,
        queue=raw["queue"] or None,
        created_from=parse_time("from", raw["from"]),
        created_to=parse_time("to", raw["to"]),
        idempotency_key=raw["idempotency_key"] or None,
        request_id=raw["request_id"] or None,
        contains=queries.parse_contains(raw["contains"]) if raw["contains"] else None,
        raw={key: value for key, value in raw.items() if value},
    )


async def read_page(
    request: Request, principal: Principal
) -> tuple[queries.TaskFilters, list[Any], str | None, queries.Count]:
    filters = filters_of(request)
    cursor = request.query_params.get("cursor") or None
    rows, next_cursor, count = await database(request).autocommit(
        queries.list_tasks,
        owner=owner_filter(principal),
        filters=filters,
        limit=PAGE_SIZE,
        cursor=cursor,
    )
    return filters, rows, next_cursor, count


@router.get("/tasks")
async def tasks(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    filters, rows, next_cursor, count = await read_page(request, principal)
    next_url = None
    if next_cursor is not None:
        next_url = f"{PREFIX}/tasks?" + urlencode({**filters.raw, "cursor": next_cursor})
    live = f"{PREFIX}/live/tasks?" + urlencode(
        {**filters.raw, **({"cursor": c} if (c := request.query_params.get("cursor")) else {})}
    )
    return page(
        request,
        "tasks.html",
        session,
        rows=[task_row(row) for row in rows],
        filters=filters.raw,
        bulk_url=f"{PREFIX}/bulk?" + urlencode(bulk_filters(filters.raw)),
        count=count,
        next_url=next_url,
        first_url=f"{PREFIX}/tasks?" + urlencode(filters.raw),
        paged="cursor" in request.query_params,
        statuses=list(TaskStatus),
        types=[t.name for t in all_task_types()],
        live=live,
        events_url=f"{PREFIX}/events",
    )


@router.get("/live/tasks")
async def live_tasks(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    _, rows, _, count = await read_page(request, principal)
    return JSONResponse({"count": str(count), "tables": {"task-list": [task_row(r) for r in rows]}})


async def read_task(
    request: Request, principal: Principal, task_id: uuid.UUID
) -> tuple[TaskRead, dict[str, Any]]:
    """The task, and its page's live values: its fields as text, its runs and deliveries."""
    detail = await database(request).autocommit(
        queries.task_detail, task_id=task_id, owner=owner_filter(principal)
    )
    task = TaskRead.model_validate(detail.task)
    runs = [run_row(TaskRunRead.model_validate(run)) for run in detail.runs]
    deliveries = [delivery_row(delivery) for delivery in detail.deliveries]
    live: dict[str, Any] = {
        "status": task.status.value,
        "attempt": f"{task.attempt} of {task.max_attempts}",
        "deliveries": str(task.deliveries),
        "worker": task.worker or NONE,
        "started": when(task.started_at),
        "finished": when(task.finished_at),
        "updated": when(task.updated_at),
        "result": pretty(task.result) if task.result is not None else NONE,
        "error-type": task.error.type if task.error else NONE,
        "error-message": task.error.message if task.error else NONE,
        "error-traceback": (task.error.traceback or NONE) if task.error else NONE,
        "tables": {"runs": runs, "webhooks": deliveries},
    }
    return task, live


@router.get("/tasks/{task_id}")
async def task_page(request: Request, session: SessionDep, task_id: uuid.UUID) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    task, live = await read_task(request, principal, task_id)
    return page(
        request,
        "task.html",
        session,
        task=task,
        live=live,
        events_url=f"{PREFIX}/events?" + urlencode({"task_id": str(task_id)}),
        unfinished=" ".join(sorted(s.value for s in UNFINISHED)),
        retryable=" ".join(RETRYABLE),
        can_submit=principal.allows(Scope.SUBMIT),
    )


@router.get("/live/tasks/{task_id}")
async def live_task(request: Request, session: SessionDep, task_id: uuid.UUID) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    _, live = await read_task(request, principal, task_id)
    return JSONResponse(live)


@router.post("/tasks/{task_id}/cancel")
async def cancel(request: Request, session: SessionDep, task_id: uuid.UUID) -> Response:
    await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    task = await database(request).transaction(
        service.cancel, task_id=task_id, owner=owner_filter(principal)
    )
    metrics.TASKS_CANCELLED.labels(task.type).inc()
    return RedirectResponse(f"{PREFIX}/tasks/{task_id}", status_code=303)


@router.post("/tasks/{task_id}/retry")
async def retry(request: Request, session: SessionDep, task_id: uuid.UUID) -> Response:
    await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    task = await database(request).transaction(
        service.retry, task_id=task_id, owner=owner_filter(principal)
    )
    submitter: Submitter = request.app.state.submitter
    await submitter.ring(task)
    return RedirectResponse(f"{PREFIX}/tasks/{task_id}", status_code=303)


# Submit and task types


def submit_page(
    request: Request,
    session: Session,
    *,
    type_name: str,
    values: dict[str, str],
    errors: dict[str, str],
    message: str | None,
    status: int = 200,
) -> Response:
    task_type = get_task_type(type_name) if type_name else None
    schema = task_type.input_model.model_json_schema() if task_type else {}
    response = page(
        request,
        "submit.html",
        session,
        types=[t.name for t in all_task_types()],
        task_type=task_type,
        fields=fields_of(schema),
        values=values,
        errors=errors,
        message=message,
    )
    response.status_code = status
    return response


@router.get("/submit")
async def submit_form(request: Request, session: SessionDep) -> Response:
    await allow(request, session, Scope.READ, "read")
    type_name = request.query_params.get("type", "")[:200]
    return submit_page(request, session, type_name=type_name, values={}, errors={}, message=None)


def error_field(loc: list[Any]) -> str:
    """Where a validation error belongs on the form: `payload.<field>`, or the form's own."""
    parts = [str(p) for p in loc if p != "body"]
    if parts[:1] == ["payload"] and len(parts) > 1:
        return f"payload.{parts[1]}"
    return parts[0] if parts else "form"


@router.post("/submit")
async def submit(request: Request, session: SessionDep) -> Response:
    form = await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    type_name = form.get("type", "")[:200]
    task_type = get_task_type(type_name)
    fields = fields_of(task_type.input_model.model_json_schema())
    errors: dict[str, str] = {}
    try:
        data = TaskCreate(
            type=type_name,
            payload=payload_of(fields, form),
            priority=form.get("priority") or 0,
            queue=form.get("queue") or None,
            countdown=form.get("countdown") or None,
        )
        submitter: Submitter = request.app.state.submitter
        record, created = await submitter.submit(
            data=data,
            owner=principal.owner,
            idempotency_key=form.get("idempotency_key") or None,
            request_id=current_request_id(),
            quota=submitter.settings.max_unfinished_tasks if principal.owner else 0,
        )
    except ValidationError as exc:
        for error in field_errors(exc.errors()):
            errors.setdefault(error_field(error["loc"]), error["msg"])
    except InvalidInput as exc:
        for error in exc.details.get("fields") or []:
            errors.setdefault(error_field(error["loc"]), error["msg"])
        if not errors:
            errors["form"] = exc.message
    if errors:
        return submit_page(
            request,
            session,
            type_name=type_name,
            values=form,
            errors=errors,
            message="The task was not submitted: see the fields marked below.",
            status=422,
        )
    task = TaskRead.model_validate(record)
    if created:
        metrics.TASKS_SUBMITTED.labels(task.type).inc()
    return RedirectResponse(f"{PREFIX}/tasks/{task.id}", status_code=303)


@router.get("/types")
async def task_types(request: Request, session: SessionDep) -> Response:
    await allow(request, session, Scope.READ, "read")
    types = [
        {
            "name": t.name,
            "description": t.description,
            "queue": t.queue,
            "max_attempts": t.max_attempts,
            "retry": t.retry,
            "time_limit": t.time_limit,
            "input_schema": pretty(t.input_model.model_json_schema()),
            "output_schema": pretty(t.output_model.model_json_schema()) if t.output_model else None,
        }
        for t in all_task_types()
    ]
    return page(request, "types.html", session, types=types)


def mount(app: FastAPI) -> None:
    """Serve the console from this app, with its own session signer and chart minutes (called
    by app.console.mount on the first console request)."""
    # Imported here: their routes build on this module's helpers.
    from app.console import bulk, schedules

    app.state.console_sessions = Sessions(settings=app.state.settings)
    # The console chart's closed minutes, per owner.
    app.state.chart_minutes = queries.ChartMinutes()
    app.include_router(router)
    app.include_router(bulk.router)
    app.include_router(schedules.router)
