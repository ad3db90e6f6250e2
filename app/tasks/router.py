"""/api/v1/tasks and /api/v1/task-types."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache, partial
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field, TypeAdapter

from app.api.deps import API_V1, Database, DatabaseDep, SubmitterDep
from app.api.middleware import current_request_id
from app.auth.dependencies import CanRead, CanSubmit, owner_filter
from app.core import metrics
from app.core.errors import described
from app.tasks import events, service
from app.tasks.exceptions import TaskNotFound
from app.tasks.registry import all_task_types, registry_version
from app.tasks.schemas import TaskCreate, TaskPage, TaskRead, TaskTypeRead
from app.tasks.states import TaskStatus

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
        422: described("Unknown type or invalid payload"),
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
    status_: Annotated[TaskStatus | None, Query(alias="status")] = None,
    type_: Annotated[str | None, Query(alias="type", max_length=200, pattern=r"^[^\x00]*$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> TaskPage:
    items, next_cursor = await database.autocommit(
        service.list_tasks,
        owner=owner_filter(principal),
        status=status_,
        type_=type_,
        limit=limit,
        cursor=cursor,
    )
    return TaskPage(
        items=[TaskRead.model_validate(task) for task in items], next_cursor=next_cursor
    )


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
    return json_response(TaskRead.model_validate(dict(row)), response)


@router.get(
    "/events",
    response_class=EventSourceResponse,
    summary="Task state changes as Server-Sent Events",
    responses={422: described("Invalid filter or Last-Event-ID")},
)
async def task_events(
    request: Request,
    principal: CanRead,
    task_id: Annotated[list[uuid.UUID] | None, Query(max_length=100)] = None,
    type_: Annotated[
        list[Annotated[str, Field(max_length=200, pattern=r"^[^\x00]*$")]] | None,
        Query(alias="type", max_length=100),
    ] = None,
    status_: Annotated[list[TaskStatus] | None, Query(alias="status")] = None,
    last_event_id: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=2**63 - 1,  # a BIGINT, as task.change_seq
            description="Replay the tasks changed after this event, then go on live.",
        ),
    ] = None,
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
        last_event_id=last_event_id,
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
