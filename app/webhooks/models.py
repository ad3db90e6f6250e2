"""A webhook delivery: one final record of a task, owed to its `notify_url`."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base, UTCDateTime, utcnow

ERROR_BYTES = 300
_PENDING = "status = 'pending'"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


_STATUSES = ", ".join(f"'{status.value}'" for status in DeliveryStatus)


class WebhookDelivery(Base):
    __tablename__ = "webhook_delivery"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    # Retention deletes tasks; their deliveries go with them.
    task_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("task.id", ondelete="CASCADE"))
    # The task's attempt that ended: a retried task that ends again owes a new delivery.
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(2000))
    # The signed body, made once, so every retry sends the same bytes under the same id.
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[DeliveryStatus] = mapped_column(
        Enum(
            DeliveryStatus,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda statuses: [status.value for status in statuses],
            validate_strings=True,
        ),
        default=DeliveryStatus.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(ERROR_BYTES))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        UniqueConstraint("task_id", "attempt"),
        # The sender's scan touches only the deliveries still owed.
        Index(
            "ix_webhook_delivery_due",
            "next_attempt_at",
            postgresql_where=text(_PENDING),
            sqlite_where=text(_PENDING),
        ),
    )
