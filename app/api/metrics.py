"""GET /metrics and the gauges read from the record and the broker (HTTP: app.api.middleware)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from celery import Celery
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from app.core import metrics
from app.core.config import Settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.schedules.models import Schedule
from app.tasks.models import Task
from app.tasks.publication import queue_depths
from app.tasks.registry import known_queues
from app.tasks.states import WAITING, TaskStatus
from app.workers import service as workers_service
from app.workers.service import QueueReport

logger = logging.getLogger(__name__)
router = APIRouter()

# Scrapes must stay fast even when the broker or the database is away.
_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="metrics")
STATE_TIMEOUT = 2.0


class StateCollector(Collector):
    """Backlog gauges read at scrape time: the outbox, tasks by status, broker queue depths.

    The database and the broker are read apart, each within its own time limit, so a slow
    broker never hides the database's gauges (which an alert reads as "database down").
    """

    def __init__(self, celery_app: Celery, *, settings: Settings) -> None:
        self.celery_app = celery_app
        self.settings = settings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from_db = _executor.submit(self._read_database)
        from_broker = _executor.submit(self._read_broker)
        try:
            outbox, by_status, queue_reports, schedules = from_db.result(timeout=STATE_TIMEOUT)
        except Exception as exc:
            logger.warning("metrics: database not readable", extra={"reason": repr(exc)[:200]})
        else:
            yield from _queue_gauges(queue_reports)
            yield GaugeMetricFamily(
                "taskdock_outbox_tasks",
                "Tasks due but not yet published to the broker.",
                value=outbox,
            )
            statuses = GaugeMetricFamily(
                "taskdock_tasks", "Task records by status.", labels=["status"]
            )
            for status in TaskStatus:
                statuses.add_metric([status.value], by_status.get(status.value, 0))
            yield statuses
            yield from _schedule_gauges(schedules)
        try:
            depths: dict[str, int] | None = from_broker.result(timeout=STATE_TIMEOUT)
        except Exception:
            depths = None
        yield GaugeMetricFamily(
            "taskdock_broker_up", "1 if the broker answered this scrape.", value=depths is not None
        )
        if depths is not None:
            queues = GaugeMetricFamily(
                "taskdock_queue_depth", "Messages waiting in the broker by queue.", labels=["queue"]
            )
            for queue, depth in sorted(depths.items()):
                queues.add_metric([queue], depth)
            yield queues

    def _read_database(
        self,
    ) -> tuple[int, dict[str, int], list[QueueReport], tuple[int, int, int, int]]:
        waiting = sorted(WAITING)
        now = utcnow()
        with session_scope() as session:
            outbox = session.scalar(
                select(func.count()).where(
                    Task.status.in_(waiting), Task.published_at.is_(None), Task.run_after <= now
                )
            )
            rows = session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
            queue_reports = workers_service.queue_report(
                session=session,
                known=known_queues(self.settings.extra_queues),
                max_age=self.settings.worker_heartbeat_max_age,
            )
            # The firing step runs in the dispatcher, which serves no metrics: its counts are
            # kept on each schedule and read here.
            active, paused, fired, skipped = session.execute(
                select(
                    func.count().filter(~Schedule.paused),
                    func.count().filter(Schedule.paused),
                    func.coalesce(func.sum(Schedule.fired_count), 0),
                    func.coalesce(func.sum(Schedule.skipped_count), 0),
                )
            ).one()
        return (
            int(outbox or 0),
            {str(s): int(c) for s, c in rows},
            queue_reports,
            (int(active), int(paused), int(fired), int(skipped)),
        )

    def _read_broker(self) -> dict[str, int]:
        return queue_depths(self.celery_app, sorted(known_queues(self.settings.extra_queues)))


def _schedule_gauges(counts: tuple[int, int, int, int]) -> Iterator[GaugeMetricFamily]:
    active, paused, fired, skipped = counts
    schedules = GaugeMetricFamily("taskdock_schedules", "Schedules by state.", labels=["state"])
    schedules.add_metric(["active"], active)
    schedules.add_metric(["paused"], paused)
    yield schedules
    slots = GaugeMetricFamily(
        "taskdock_schedule_slots",
        "Slots of the existing schedules: fired, or skipped (overlap, missed beyond the catch-up "
        "policy, or no valid task).",
        labels=["outcome"],
    )
    slots.add_metric(["fired"], fired)
    slots.add_metric(["skipped"], skipped)
    yield slots


def _queue_gauges(reports: list[QueueReport]) -> Iterator[GaugeMetricFamily]:
    """Per queue, from the record: what waits, since when, and who consumes it."""
    families = (
        ("taskdock_queue_waiting", "Tasks due and waiting for a worker, by queue.", "waiting"),
        (
            "taskdock_queue_oldest_waiting_seconds",
            "How long the oldest due task of the queue has waited.",
            "oldest_seconds",
        ),
        (
            "taskdock_queue_consumers",
            "Live workers (recent heartbeat) consuming the queue; 0 with work waiting: stranded.",
            "consumers",
        ),
    )
    for name, documentation, attribute in families:
        family = GaugeMetricFamily(name, documentation, labels=["queue"])
        for report in reports:
            family.add_metric([report.name], getattr(report, attribute))
        yield family


@router.get("/metrics", include_in_schema=False)
def scrape(request: Request) -> Response:
    registry = metrics.collecting_registry()
    body = generate_latest(registry) + generate_latest(request.app.state.state_registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
