"""The API side of webhooks: a submission's `notify_url` checked, a task's deliveries listed."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import InvalidInput
from app.tasks import service as tasks_service
from app.webhooks import guard, signing
from app.webhooks.models import DeliveryStatus, WebhookDelivery
from app.webhooks.schemas import DeliveryRead


def message_id(delivery_id: uuid.UUID) -> str:
    """The `webhook-id` of a delivery: one per delivery, the same on each of its retries."""
    return f"msg_{delivery_id.hex}"


async def check_notify_url(*, url: str, settings: Settings) -> None:
    """InvalidInput (422 naming `notify_url`) unless webhooks are on and `url` leads to an
    address the guard allows."""
    if not signing.enabled(settings):
        raise _invalid(signing.WebhooksOff.message)
    try:
        await guard.resolve_async(url, guard.networks(settings.webhook_allowed_networks))
    except guard.UnsafeUrl as exc:
        raise _invalid(f"notify_url refused: {exc}") from None


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(
        message, fields=[{"loc": ["body", "notify_url"], "msg": message, "type": "value_error"}]
    )


def list_deliveries(
    *, session: Session, task_id: uuid.UUID, owner: str | None
) -> list[DeliveryRead]:
    """The deliveries of a task the caller may see, oldest first (TaskNotFound otherwise)."""
    tasks_service.get(session=session, task_id=task_id, owner=owner)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.task_id == task_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.attempt)
    )
    return [
        DeliveryRead(
            id=row.id,
            webhook_id=message_id(row.id),
            attempt=row.attempt,
            url=row.url,
            status=row.status,
            attempts=row.attempts,
            next_attempt_at=row.next_attempt_at if row.status is DeliveryStatus.PENDING else None,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=row.created_at,
            delivered_at=row.delivered_at,
        )
        for row in rows
    ]
