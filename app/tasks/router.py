"""/api/v1/tasks and /api/v1/task-types."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache, partial
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.deps import API_V1, Database, DatabaseDep, SubmitterDep
from app.api.middleware import current_request_id
from app.auth.dependencies import CanRead, CanSubmit, owner_filter
from app.core import metrics
from app.core.errors import described
from app.tasks import bulk, events, service
from app.tasks.exceptions import TaskNotFound
from app.tasks.registry import all_task_types, registry_version
from app.tasks.schemas import (
    BulkAction,
    BulkResult,
    TaskCreate,
    TaskPage,
    TaskRead,
    TaskRunRead,
    TaskRuns,
    TaskTypeRead,
)
from app.tasks.states import TaskStatus
from app.webhooks.service import check_notify_url

logger = logging.getLogger(__name__)
router = APIRouter(prefix=API_V1, tags=["tasks"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="Repeating a request with the same key returns the first task.",
    ),
]


@router.post(
    "/tasks",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskRead,
    summary="Submit a task",
    responses={
        200: {"model": TaskRead, "description": "A repeat of an earlier Idempotency-Key"},
        409: described("Idempotency-Key reused with a different body"),
        413: described("Body too large"),
        429: described("Rate limit or unfinished-task quota reached"),
        422: described("Unknown type, invalid payload, or a refused notify_url"),
        503: described("The database is unavailable; nothing was recorded"),
    },
)
async def submit_task(
    data: TaskCreate,
    submitter: SubmitterDep,
    principal: CanSubmit,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    if data.notify_url is not None:
        # A DNS lookup, off the event loop; a submission without a notify_url pays nothing.
        await check_notify_url(url=data.notify_url, settings=submitter.settings)
    # The protocol (commit, publish, record) is app/tasks/publication.py's.
    record, created = await submitter.submit(
        data=data,
        owner=principal.owner,
        idempotency_key=idempotency_key,
        request_id=current_request_id(),
        quota=submitter.settings.max_unfinished_tasks if principal.owner else 0,
    )
    read = TaskRead.model_validate(record)
    response.headers["Location"] = f"/api/v1/tasks/{read.id}"
    if created:
        metrics.TASKS_SUBMITTED.labels(read.type).inc()
    else:
        response.status_code = status.HTTP_200_OK
    return json_response(read, response, status_code=status.HTTP_202_ACCEPTED)


@router.get(
    "/tasks",
    response_model=TaskPage,
    summary="List tasks, newest first",
    responses={422: described("Invalid filter or cursor")},
)
async def list_tasks(
    database: DatabaseDep,
    principal: CanRead,
    response: Response,
    status_: Annotated[TaskStatus | None, Query(alias="status")] = None,
    type_: Annotated[str | None, Query(alias="type", max_length=200, pattern=r"^[^\x00]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    include: Annotated[
        Literal["result"] | None,
        Query(
            description="`result`: each item's result and error traceback too; the page then "
            "ends early once its results pass TASKDOCK_LIST_MAX_BYTES (it has at least one item)."
        ),
    ] = None,
) -> Response:
    with_results = include == "result"
    rows, next_cursor = await database.autocommit(
        service.list_tasks,
        owner=owner_filter(principal),
        status=status_,
        type_=type_,
        limit=limit,
        cursor=cursor,
        include_result=with_results,
        max_bytes=database.settings.list_max_bytes,
    )
    items = b",".join(task_json(row, with_result=with_results) for row in rows)
    cursor_json = json.dumps(next_cursor).encode()
    return json_response(b'{"items":[%s],"next_cursor":%s}' % (items, cursor_json), response)


@router.api_route("/tasks/cancel", methods=["GET"], include_in_schema=False)
@router.api_route("/tasks/retry", methods=["GET"], include_in_schema=False)
async def bulk_routes_take_post(_: CanRead) -> None:
    # Registered before GET /tasks/{task_id}, which would otherwise take these paths and
    # answer 422 (not a UUID) where the method is what is wrong.
    raise StarletteHTTPException(status.HTTP_405_METHOD_NOT_ALLOWED, headers={"Allow": "POST"})


@router.get(
    "/tasks/{task_id}",
    response_model=TaskRead,
    summary="Read a task",
    responses={404: described("No such task")},
)
async def get_task(
    task_id: uuid.UUID,
    request: Request,
    principal: CanRead,
    response: Response,
    wait: Annotated[
        float | None,
        Query(
            gt=0,
            le=60,
            description="Answer as soon as the task is final, or after this many seconds "
            "with the record as it is then.",
        ),
    ] = None,
) -> Response:
    # The hottest route: one prepared SELECT and the JSON made once by Pydantic's serializer,
    # not an ORM object validated, turned into a dict and encoded again by FastAPI; and as few
    # dependencies as FastAPI allows (each costs a node to solve), so the database is taken
    # from the app's state rather than from DatabaseDep.
    database: Database = request.app.state.database
    owner = owner_filter(principal)
    statement = service.read_statement(task_id=task_id, owner=owner)
    if wait is None:
        row = await database.fetch_one(*statement)
    else:
        row = await events.wait_for_final(
            hub=request.app.state.events,
            task_id=task_id,
            key=(task_id, owner),
            seconds=wait,
            read=partial(database.fetch_one, *statement),
        )
    if row is None:
        raise TaskNotFound(task_id=str(task_id))
    return json_response(task_json(dict(row)), response)


_LEFT_OUT: dict[str, Any] = {"result": True}
# List items without results leave out the traceback too.
_LEFT_OUT_OF_ITEMS: dict[str, Any] = {"result": True, "error": {"traceback": True}}


def task_json(row: dict[str, Any], *, with_result: bool = True) -> bytes:
    """A task's answer from its row, whose `result` is JSON text (service.RESULT_TEXT).

    That text goes into the answer as it is, never decoded: decoding and encoding a result again
    cost the event loop time in proportion to its size (a thread would not help, the GIL stays
    held), and every other request waited that long. The record holds only valid JSON.
    """
    raw: str | None = row.pop("result", None)
    body = TaskRead.__pydantic_serializer__.to_json(
        TaskRead.model_validate(row), exclude=_LEFT_OUT if with_result else _LEFT_OUT_OF_ITEMS
    )
    if not with_result:
        return body
    result = b"null" if raw is None else raw.encode()
    return b'%s,"result":%s}' % (body[:-1], result)


_BULK_RESPONSES: dict[int | str, dict[str, Any]] = {
    422: described("No criterion, no or too large a limit, or a status the action never takes"),
}


@router.post(
    "/tasks/cancel",
    response_model=BulkResult,
    summary="Cancel the tasks a filter matches (at most `limit`)",
    responses=_BULK_RESPONSES,
)
async def cancel_tasks(
    action: BulkAction, database: DatabaseDep, principal: CanSubmit
) -> BulkResult:
    done = await bulk.cancel(database=database, action=action, owner=owner_filter(principal))
    for type_, count in done.types.items():
        metrics.TASKS_CANCELLED.labels(type_).inc(count)
    return done.result


@router.post(
    "/tasks/retry",
    response_model=BulkResult,
    summary="Retry the FAILED or CANCELLED tasks a filter matches (at most `limit`)",
    responses=_BULK_RESPONSES,
)
async def retry_tasks(
    action: BulkAction, database: DatabaseDep, principal: CanSubmit
) -> BulkResult:
    # The new attempts wait in the outbox: the dispatcher publishes them in batches.
    done = await bulk.retry(database=database, action=action, owner=owner_filter(principal))
    return done.result


@router.get(
    "/tasks/{task_id}/runs",
    response_model=TaskRuns,
    summary="Every run of a task, oldest first",
    responses={404: described("No such task")},
)
async def list_task_runs(task_id: uuid.UUID, database: DatabaseDep, principal: CanRead) -> TaskRuns:
    runs = await database.autocommit(
        service.list_runs, task_id=task_id, owner=owner_filter(principal)
    )
    return TaskRuns(task_id=task_id, items=[TaskRunRead.model_validate(run) for run in runs])


async def stream_start(
    request: Request,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=2**63 - 1,  # a BIGINT, as task.change_seq
            description="Replay the tasks changed after this event, then go on live.",
        ),
    ] = None,
) -> int:
    """Where a stream starts: after Last-Event-ID, or after the newest change when the request
    came. Read here, before the answer starts: the body of a stream runs only once its 200 has
    gone out, and a change the client makes on seeing that 200 must not fall before the start."""
    if last_event_id is not None:
        return last_event_id
    hub: events.EventHub = request.app.state.events
    return int(await hub.run(events.head))


@router.get(
    "/events",
    response_class=EventSourceResponse,
    summary="Task state changes as Server-Sent Events",
    responses={422: described("Invalid filter or Last-Event-ID")},
)
async def task_events(
    request: Request,
    principal: CanRead,
    after: Annotated[int, Depends(stream_start)],
    task_id: Annotated[list[uuid.UUID] | None, Query(max_length=100)] = None,
    type_: Annotated[
        list[Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")]] | None,
        Query(alias="type", max_length=100),
    ] = None,
    status_: Annotated[list[TaskStatus] | None, Query(alias="status")] = None,
) -> AsyncIterator[ServerSentEvent]:
    # Each filter may be repeated; a change matches when it matches one value of each given.
    where = events.EventFilter(
        owner=owner_filter(principal),
        task_ids=frozenset(task_id or ()),
        types=frozenset(type_ or ()),
        statuses=frozenset(status_ or ()),
    )
    async for event in events.stream(
        hub=request.app.state.events,
        where=where,
        after=after,
        heartbeat=request.app.state.settings.events_heartbeat_seconds,
    ):
        yield event


def json_response(
    content: BaseModel | bytes, response: Response, *, status_code: int = status.HTTP_200_OK
) -> Response:
    """`content` (a model, or JSON made already) as the answer, with the headers and status the
    route and its dependencies set on `response` (the rate limit's headers, the Location)."""
    if isinstance(content, BaseModel):
        content = content.__pydantic_serializer__.to_json(content)
    return Response(
        content,
        status_code=response.status_code or status_code,
        headers=response.headers,
        media_type="application/json",
    )


@router.post(
    "/tasks/{task_id}/cancel",
    response_model=TaskRead,
    summary="Cancel a queued or running task",
    responses={
        404: described("No such task"),
        409: described("The task has already finished"),
    },
)
async def cancel_task(task_id: uuid.UUID, database: DatabaseDep, principal: CanSubmit) -> TaskRead:
    # A running task is not killed: its lease renewal sees CANCELLED within a third of the lease
    # and tells the run to stop. Celery's revoke(terminate=True) signals a pool process, which
    # may be running another task by the time the signal lands.
    task = await database.transaction(
        service.cancel, task_id=task_id, owner=owner_filter(principal)
    )
    metrics.TASKS_CANCELLED.labels(task.type).inc()
    return TaskRead.model_validate(task)


@router.post(
    "/tasks/{task_id}/retry",
    response_model=TaskRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Run a FAILED or CANCELLED task again as a new attempt",
    responses={
        404: described("No such task"),
        409: described("The task is not FAILED or CANCELLED"),
    },
)
async def retry_task(
    task_id: uuid.UUID, database: DatabaseDep, submitter: SubmitterDep, principal: CanSubmit
) -> TaskRead:
    task = await database.transaction(service.retry, task_id=task_id, owner=owner_filter(principal))
    await submitter.ring(task)
    return TaskRead.model_validate(task)


@router.get(
    "/task-types",
    response_model=list[TaskTypeRead],
    summary="Registered task types",
)
async def list_task_types(principal: CanRead, response: Response) -> Response:
    return json_response(task_types_json(registry_version()), response)


_TASK_TYPES = TypeAdapter(list[TaskTypeRead])


@lru_cache(maxsize=1)
def task_types_json(version: int) -> bytes:
    """The task types as JSON, built once per `version` of the registry: building their JSON
    schemas costs milliseconds, and types are registered at start."""
    return _TASK_TYPES.dump_json(
        [
            TaskTypeRead(
                name=task.name,
                description=task.description,
                queue=task.queue,
                max_attempts=task.max_attempts,
                time_limit=task.time_limit,
                input_schema=task.input_model.model_json_schema(),
                output_schema=task.output_model.model_json_schema() if task.output_model else None,
            )
            for task in all_task_types()
        ]
    )
