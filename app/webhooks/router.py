"""/api/v1/tasks/{id}/deliveries: a task's webhook deliveries."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import API_V1, DatabaseDep
from app.auth.dependencies import CanRead, owner_filter
from app.core.errors import described
from app.webhooks import service
from app.webhooks.schemas import DeliveryList

router = APIRouter(prefix=API_V1, tags=["webhooks"])


@router.get(
    "/tasks/{task_id}/deliveries",
    response_model=DeliveryList,
    summary="A task's webhook deliveries",
    responses={404: described("No such task")},
)
async def list_deliveries(
    task_id: uuid.UUID, database: DatabaseDep, principal: CanRead
) -> DeliveryList:
    items = await database.autocommit(
        service.list_deliveries, task_id=task_id, owner=owner_filter(principal)
    )
    return DeliveryList(items=items)
