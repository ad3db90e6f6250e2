"""What the API shows of webhook deliveries."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.webhooks.models import DeliveryStatus


class DeliveryRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    webhook_id: str = Field(description="The `webhook-id` header: the same on every retry.")
    attempt: int = Field(description="The task's attempt whose end this delivery reports.")
    url: str
    status: DeliveryStatus
    attempts: int = Field(description="POSTs tried so far.")
    next_attempt_at: datetime | None = Field(description="When the next try is due (pending).")
    last_status_code: int | None = Field(description="The receiver's last HTTP status.")
    last_error: str | None = Field(description="Why the last try failed (at most 300 bytes).")
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    items: list[DeliveryRead]
