"""The console's bulk page: cancel or retry the tasks a filter matches, after a dry-run count.

GET counts (the API's dry run: one bounded read) and shows a confirmation naming the count;
the confirmation POSTs the same filter with the CSRF token; the action runs as
`POST /api/v1/tasks/cancel|retry` does (app.tasks.bulk: the single-task transitions, in short
batches), and the answer redirects to the count again, so reloading it changes nothing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import ValidationError

from app.auth.dependencies import owner_filter
from app.auth.service import Principal, Scope
from app.console.mount import PREFIX
from app.console.router import (
    BULK_FILTERS,
    ConsoleRoute,
    SessionDep,
    allow,
    checked_form,
    database,
    page,
    parse_time,
)
from app.console.session import Session
from app.core import metrics
from app.core.errors import InvalidInput, field_errors
from app.tasks import bulk
from app.tasks.registry import all_task_types
from app.tasks.schemas import MAX_BULK, BulkAction

router = APIRouter(prefix=PREFIX, route_class=ConsoleRoute, include_in_schema=False)

ACTIONS = {"cancel": (bulk.cancel, bulk.CANCELLABLE), "retry": (bulk.retry, bulk.RETRYABLE)}
DEFAULT_LIMIT = 1000
# What the form carries from the count to the confirmation.
FIELDS = ("action", *BULK_FILTERS, "limit")


def action_of(values: dict[str, str], *, dry_run: bool) -> BulkAction:
    """The API's BulkAction from the form's text; ValidationError or InvalidInput name the field."""
    status = values.get("status")
    return BulkAction.model_validate(
        {
            "status": [status] if status else None,
            "type": values.get("type") or None,
            "queue": values.get("queue") or None,
            "created_after": parse_time("from", values.get("from", "")),
            "created_before": parse_time("to", values.get("to", "")),
            "limit": int(values["limit"]) if values.get("limit", "").isdigit() else -1,
            "dry_run": dry_run,
        }
    )


def problem_of(exc: ValidationError | InvalidInput) -> str:
    errors = field_errors(exc.errors()) if isinstance(exc, ValidationError) else []
    if isinstance(exc, InvalidInput):
        errors = exc.details.get("fields") or []
        if not errors:
            return exc.message
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'filter'}: {e['msg']}"
        for e in errors
    )


async def perform(
    request: Request, principal: Principal, values: dict[str, str], *, dry_run: bool
) -> bulk.Outcome | str:
    """The action (or its dry run) as the API's route runs it, or why the filter is refused."""
    run, _ = ACTIONS[values["action"]]
    try:
        return await run(
            database=database(request),
            action=action_of(values, dry_run=dry_run),
            owner=owner_filter(principal),
        )
    except (ValidationError, InvalidInput) as exc:
        return problem_of(exc)


def form_values(source: dict[str, str]) -> dict[str, str]:
    values = {name: source.get(name, "")[:500] for name in FIELDS}
    if values["action"] not in ACTIONS:
        values["action"] = "retry"
    values["limit"] = values["limit"] or str(DEFAULT_LIMIT)
    return values


def bulk_page(
    request: Request,
    session: Session,
    *,
    values: dict[str, str],
    matched: int | None,
    problem: str | None,
    done: dict[str, str] | None,
    status: int = 200,
) -> Response:
    response = page(
        request,
        "bulk.html",
        session,
        values=values,
        matched=matched,
        problem=problem,
        done=done,
        statuses={name: sorted(statuses) for name, (_, statuses) in ACTIONS.items()},
        types=[t.name for t in all_task_types()],
        max_limit=MAX_BULK,
        tasks_url=f"{PREFIX}/tasks?"
        + urlencode({k: v for k, v in values.items() if k in BULK_FILTERS and v}),
        can_submit=session.principal.allows(Scope.SUBMIT),
    )
    response.status_code = status
    return response


@router.get("/bulk")
async def bulk_form(request: Request, session: SessionDep) -> Response:
    principal = await allow(request, session, Scope.READ, "read")
    params = request.query_params
    values = form_values(dict(params))
    counted = "action" in params and any(values[name] for name in BULK_FILTERS)
    matched, problem = None, None
    if counted:
        found = await perform(request, principal, values, dry_run=True)
        matched, problem = (None, found) if isinstance(found, str) else (found.result.matched, None)
    done = None
    if params.get("changed", "").isdigit() and params.get("done") in ACTIONS:
        done = {"action": params["done"], "changed": params["changed"]}
    return bulk_page(
        request,
        session,
        values=values,
        matched=matched,
        problem=problem,
        done=done,
        status=422 if problem else 200,
    )


@router.post("/bulk")
async def bulk_action(request: Request, session: SessionDep) -> Response:
    form = await checked_form(request, session)
    principal = await allow(request, session, Scope.SUBMIT, "submit")
    values = form_values(form)
    done = await perform(request, principal, values, dry_run=False)
    if isinstance(done, str):
        return bulk_page(
            request, session, values=values, matched=None, problem=done, done=None, status=422
        )
    if values["action"] == "cancel":
        for type_, number in done.types.items():
            metrics.TASKS_CANCELLED.labels(type_).inc(number)
    shown: dict[str, Any] = {k: v for k, v in values.items() if v}
    shown.update(done=values["action"], changed=done.result.changed)
    return RedirectResponse(f"{PREFIX}/bulk?" + urlencode(shown), status_code=303)
