"""/api/v1/tasks and /api/v1/task-types."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response, status

from app.api.deps import API_V1, DatabaseDep, PublisherDep
from app.api.ratelimit import rate_limit
from app.api.request_id import current_request_id
from app.auth.dependencies import CanRead, CanSubmit, owner_filter
from app.core import metrics
from app.core.config import get_settings
from app.core.errors import described
from app.db.base import utcnow
from app.tasks import service
from app.tasks.models import Task
from app.tasks.registry import all_task_types
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


async def _publish(
    *, database: DatabaseDep, publisher: PublisherDep, task: Task, marked: bool
) -> bool:
    """After the commit: ring the broker now if the task is due; the dispatcher covers misses.

    With TASKDOCK_PUBLISH_ON_SUBMIT=false the dispatcher rings it: the commit woke it.

    `marked` says the record already claims the publication (submit records it in its one
    insert); otherwise a successful publish is recorded afterwards. True if the broker was told.
    """
    if (
        not get_settings().publish_on_submit
        or task.run_after > utcnow()
        or task.status != TaskStatus.QUEUED
    ):
        return False
    sent = await publisher.publish(service.doorbell(task))
    if sent == marked:
        return sent
    change = service.mark_published if sent else service.unmark_published
    try:
        await database.autocommit(change, task_id=task.id, attempt=task.attempt)
    except Exception:
        # The request has succeeded and the task is recorded. A missing mark costs one duplicate
        # message; a missing unmark leaves the task to the dispatcher's lost-message sweep.
        logger.warning("could not record a task's publication", exc_info=True)
    return sent


SubmitLimit = [Depends(rate_limit("submit"))]
ReadLimit = [Depends(rate_limit("read"))]


@router.post(
    "/tasks",
    dependencies=SubmitLimit,
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
    database: DatabaseDep,
    publisher: PublisherDep,
    principal: CanSubmit,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> TaskRead:
    # One statement writes (the INSERT): it commits on its own, durably.
    task, created = await database.autocommit(
        service.submit,
        data=data,
        owner=principal.owner,
        idempotency_key=idempotency_key,
        request_id=current_request_id(),
        max_unfinished=get_settings().max_unfinished_tasks if principal.owner else 0,
        publishing=get_settings().publish_on_submit and not publisher.quiet,
    )
    # Committed: durable before anything else happens.
    response.headers["Location"] = f"/api/v1/tasks/{task.id}"
    if not created:
        response.status_code = status.HTTP_200_OK
        return TaskRead.model_validate(task)
    metrics.TASKS_SUBMITTED.labels(task.type).inc()
    sent = await _publish(
        database=database, publisher=publisher, task=task, marked=task.published_at is not None
    )
    read = TaskRead.model_validate(task)
    if not sent:
        read.queued_at = None  # as the record now says: the dispatcher will publish it
    return read


@router.get(
    "/tasks",
    dependencies=ReadLimit,
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
    dependencies=ReadLimit,
    response_model=TaskRead,
    summary="Read a task",
    responses={404: described("No such task")},
)
async def get_task(task_id: uuid.UUID, database: DatabaseDep, principal: CanRead) -> TaskRead:
    task = await database.autocommit(service.get, task_id=task_id, owner=owner_filter(principal))
    return TaskRead.model_validate(task)


@router.post(
    "/tasks/{task_id}/cancel",
    dependencies=SubmitLimit,
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
    dependencies=SubmitLimit,
    response_model=TaskRead,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Run a FAILED or CANCELLED task again as a new attempt",
    responses={
        404: described("No such task"),
        409: described("The task is not FAILED or CANCELLED"),
    },
)
async def retry_task(
    task_id: uuid.UUID, database: DatabaseDep, publisher: PublisherDep, principal: CanSubmit
) -> TaskRead:
    task = await database.transaction(service.retry, task_id=task_id, owner=owner_filter(principal))
    await _publish(database=database, publisher=publisher, task=task, marked=False)
    return TaskRead.model_validate(task)


@router.get(
    "/task-types",
    dependencies=ReadLimit,
    response_model=list[TaskTypeRead],
    summary="Registered task types",
)
async def list_task_types(principal: CanRead) -> list[TaskTypeRead]:
    return [
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
