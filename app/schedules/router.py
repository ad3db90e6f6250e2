"""/api/v1/schedules: owned by the API key that made them, like tasks."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from app.api.deps import API_V1, DatabaseDep
from app.auth.dependencies import CanRead, CanSubmit, owner_filter
from app.core.errors import described
from app.schedules import service
from app.schedules.schemas import ScheduleCreate, ScheduleList, ScheduleRead, ScheduleUpdate
from app.webhooks.service import check_notify_url

router = APIRouter(prefix=API_V1, tags=["schedules"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: described("No such schedule")}
INVALID: dict[int | str, dict[str, Any]] = {
    422: described("Bad cron, time zone, task type, payload, queue or notify_url")
}


@router.post(
    "/schedules",
    status_code=status.HTTP_201_CREATED,
    response_model=ScheduleRead,
    summary="Create a schedule",
    responses={409: described("The API key has a schedule of that name"), **INVALID},
)
async def create_schedule(
    data: ScheduleCreate,
    request: Request,
    database: DatabaseDep,
    principal: CanSubmit,
    response: Response,
) -> ScheduleRead:
    if data.notify_url is not None:
        await check_notify_url(url=data.notify_url, settings=request.app.state.settings)
    schedule = await database.transaction(
        service.create,
        data=data,
        owner=principal.owner,
        extra_queues=request.app.state.settings.extra_queues,
    )
    response.headers["Location"] = f"{API_V1}/schedules/{schedule.id}"
    return ScheduleRead.model_validate(schedule)


@router.get("/schedules", response_model=ScheduleList, summary="List schedules, oldest first")
async def list_schedules(
    database: DatabaseDep,
    principal: CanRead,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> ScheduleList:
    items = await database.autocommit(
        service.list_schedules, owner=owner_filter(principal), limit=limit
    )
    return ScheduleList(items=[ScheduleRead.model_validate(item) for item in items])


@router.get(
    "/schedules/{schedule_id}",
    response_model=ScheduleRead,
    summary="Read a schedule",
    responses=NOT_FOUND,
)
async def get_schedule(
    schedule_id: uuid.UUID, database: DatabaseDep, principal: CanRead
) -> ScheduleRead:
    schedule = await database.autocommit(
        service.get, schedule_id=schedule_id, owner=owner_filter(principal)
    )
    return ScheduleRead.model_validate(schedule)


@router.patch(
    "/schedules/{schedule_id}",
    response_model=ScheduleRead,
    summary="Change a schedule (only the fields given)",
    responses={**NOT_FOUND, 409: described("The API key has a schedule of that name"), **INVALID},
)
async def update_schedule(
    schedule_id: uuid.UUID,
    data: ScheduleUpdate,
    request: Request,
    database: DatabaseDep,
    principal: CanSubmit,
) -> ScheduleRead:
    if data.notify_url is not None:
        await check_notify_url(url=data.notify_url, settings=request.app.state.settings)
    schedule = await database.transaction(
        service.update,
        schedule_id=schedule_id,
        owner=owner_filter(principal),
        data=data,
        extra_queues=request.app.state.settings.extra_queues,
    )
    return ScheduleRead.model_validate(schedule)


@router.post(
    "/schedules/{schedule_id}/pause",
    response_model=ScheduleRead,
    summary="Pause a schedule",
    responses=NOT_FOUND,
)
async def pause_schedule(
    schedule_id: uuid.UUID, database: DatabaseDep, principal: CanSubmit
) -> ScheduleRead:
    schedule = await database.transaction(
        service.pause, schedule_id=schedule_id, owner=owner_filter(principal)
    )
    return ScheduleRead.model_validate(schedule)


@router.post(
    "/schedules/{schedule_id}/resume",
    response_model=ScheduleRead,
    summary="Resume a schedule from its next slot",
    responses=NOT_FOUND,
)
async def resume_schedule(
    schedule_id: uuid.UUID, database: DatabaseDep, principal: CanSubmit
) -> ScheduleRead:
    schedule = await database.transaction(
        service.resume, schedule_id=schedule_id, owner=owner_filter(principal)
    )
    return ScheduleRead.model_validate(schedule)


@router.delete(
    "/schedules/{schedule_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a schedule (its tasks stay)",
    responses=NOT_FOUND,
)
async def delete_schedule(
    schedule_id: uuid.UUID, database: DatabaseDep, principal: CanSubmit
) -> Response:
    await database.transaction(
        service.delete, schedule_id=schedule_id, owner=owner_filter(principal)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
