"""The dispatcher process: the loop that runs the outbox (app.tasks.publication), the sweeps
of app.tasks.recovery, the firing of due schedules (app.schedules.firing) and the retention
purge (app.tasks.retention).

Runs as its own process (`taskdock dispatcher`); several may run on PostgreSQL, since
each batch is taken with FOR UPDATE SKIP LOCKED. On PostgreSQL a commit that puts a task in
the outbox wakes it at once (migration 0004's trigger and LISTEN); otherwise, and whenever
the notifications are away, it looks every TASKDOCK_DISPATCHER_INTERVAL seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy import Engine

from app.core.config import Settings
from app.core.db import get_engine
from app.schedules.firing import Scheduler
from app.tasks.publication import publish_outbox
from app.tasks.recovery import Recovery, Swept
from app.tasks.retention import Purged, Retention
from app.webhooks.delivery import WebhookSender

logger = logging.getLogger(__name__)


@dataclass
class TickReport:
    published: int = 0
    swept: Swept | None = None  # when this tick ran the recovery sweeps
    purged: Purged | None = None  # when this tick ran (a slice of) the retention purge
    errors: list[str] = field(default_factory=list)


class Dispatcher:
    def __init__(self, *, settings: Settings, celery_app: Celery) -> None:
        self.settings = settings
        self.celery_app = celery_app
        engine = get_engine()
        self.lock_rows = engine.dialect.name == "postgresql"
        self._last_sweep = 0.0
        self.recovery = Recovery(settings=settings, celery_app=celery_app, lock=self.lock_rows)
        self.scheduler = Scheduler(settings=settings, celery_app=celery_app, lock=self.lock_rows)
        self.retention = Retention(settings=settings, engine=engine, lock=self.lock_rows)
        self._stop = threading.Event()
        self.listener = OutboxListener(engine, self._stop) if self.lock_rows else None
        # Webhooks go out from a thread of their own: a slow receiver never delays the outbox.
        self.webhooks = WebhookSender(settings=settings, lock=self.lock_rows, stop=self._stop)
        # Without the API's own publish there is nothing to wait for: fresh rows are ours.
        self.grace = settings.dispatch_grace_seconds if settings.publish_on_submit else 0.0

    def tick(self) -> TickReport:
        report = TickReport()
        now = time.monotonic()
        # The reaper and the lost-message sweep need not run every tick.
        if now - self._last_sweep >= self.settings.reaper_interval:
            self._last_sweep = now
            report.swept = self.recovery.sweep()
            report.errors.extend(report.swept.errors)
        report.errors.extend(self.scheduler.fire_due().errors)
        self._publish_due(report)
        report.purged = self.retention.tick()
        return report

    def _publish_due(self, report: TickReport) -> None:
        try:
            outbox = publish_outbox(
                celery_app=self.celery_app,
                settings=self.settings,
                limit=self.settings.dispatcher_batch_size,
                grace=self.grace,
                lock=self.lock_rows,
            )
        except Exception as exc:
            report.errors.append(f"outbox: {exc}")
            logger.warning("outbox scan failed", exc_info=True)
            return
        report.published = outbox.sent
        if outbox.error is not None:
            report.errors.append(f"publish: {outbox.error}")
            logger.warning(
                "broker unavailable; tasks stay in the outbox",
                extra={"waiting": outbox.waiting, "reason": str(outbox.error)},
            )

    def run_forever(self, *, heartbeat_file: Path | None = None) -> None:
        logger.info("dispatcher started", extra={"interval": self.settings.dispatcher_interval})
        self.webhooks.start()
        while not self._stop.is_set():
            report = self.tick()
            if heartbeat_file is not None and not report.errors:
                touch(heartbeat_file)
            if report.published:
                logger.info("published from the outbox", extra={"count": report.published})
            # A full batch means more is waiting: go again at once.
            if report.published < self.settings.dispatcher_batch_size:
                self.wait(self.settings.dispatcher_interval)
        if self.listener is not None:
            self.listener.close()
        logger.info("dispatcher stopped")

    def wait(self, timeout: float) -> None:
        """Until the outbox has news (PostgreSQL) or `timeout` has passed."""
        if self.listener is None:
            self._stop.wait(timeout)
        else:
            self.listener.wait(timeout)

    def stop(self) -> None:
        self._stop.set()


CHANNEL = "taskdock_outbox"
STOP_CHECK_SECONDS = 0.25


class OutboxListener:
    """LISTENs on its own connection for migration 0004's notifications.

    A notification only says "look now": the outbox query decides what is due, so one that is
    lost (the database restarted, the connection broke) costs at most one interval.
    """

    def __init__(self, engine: Engine, stop: threading.Event) -> None:
        self.engine = engine
        self.stop = stop
        self._connection: Any = None

    def wait(self, timeout: float) -> bool:
        """True if the outbox may have news: a notification came within `timeout` (every
        pending one is consumed), or listening has just begun, so a commit made before it was
        not heard and one look at the outbox is owed."""
        try:
            if self._connection is None or self._connection.closed:
                self._connect()
                return True
            connection = self._connection
            deadline = time.monotonic() + timeout
            # In slices, so a stop is heard within one even when the interval is long.
            while not self.stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                slice_ = min(remaining, STOP_CHECK_SECONDS)
                if any(True for _ in connection.notifies(timeout=slice_, stop_after=1)):
                    # One look at the outbox answers every commit so far: under load, hundreds
                    # arrive per batch, and none may pile up behind the connection.
                    for _ in connection.notifies(timeout=0):
                        pass
                    return True
            return False
        except Exception as exc:
            logger.warning(
                "outbox notifications unavailable; polling", extra={"reason": str(exc)[:200]}
            )
            self.close()
            self.stop.wait(timeout)
            return False

    def _connect(self) -> None:
        pooled = self.engine.raw_connection()
        connection: Any = pooled.driver_connection
        # Its own connection for as long as it listens, outside the pool.
        pooled.detach()
        connection.autocommit = True
        connection.execute(f"LISTEN {CHANNEL}")
        self._connection = connection

    def close(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # already broken: nothing more to release
                logger.debug("closing the outbox listener failed", exc_info=True)
            self._connection = None


def touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        logger.warning("cannot write heartbeat file", extra={"path": str(path)})
