"""The webhook gauge, read from the record at each scrape of the API's /metrics.

Deliveries are made by the dispatchers; the record holds every outcome, so any API process
reports them all, and the count is the same whichever dispatcher made them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core.db import session_scope
from app.webhooks.models import DeliveryStatus, WebhookDelivery

logger = logging.getLogger(__name__)


def count_by_status() -> dict[str, int]:
    with session_scope() as session:
        rows = session.execute(
            select(WebhookDelivery.status, func.count()).group_by(WebhookDelivery.status)
        ).all()
    return {str(status): int(count) for status, count in rows}


class DeliveryCollector(Collector):
    """taskdock_webhook_deliveries{status}: pending, delivered, failed."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = count_by_status()
        except Exception as exc:
            logger.warning("metrics: deliveries not readable", extra={"reason": repr(exc)[:200]})
            return
        family = GaugeMetricFamily(
            "taskdock_webhook_deliveries",
            "Webhook deliveries by status: pending (being tried), delivered, failed (window over).",
            labels=["status"],
        )
        for status in DeliveryStatus:
            family.add_metric([status.value], counts.get(status.value, 0))
        yield family
