"""Worker-process wiring: logging, a consumer heartbeat file, the health check that reads it,
and a sweep of the event loop's timer."""

from __future__ import annotations

import heapq
import logging
import os
import threading
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals
from kombu.asynchronous.timer import Timer

from app.core import collector
from app.core.config import Settings, warn_unknown_variables
from app.core.logging import configure_logging
from app.core.multiproc import MULTIPROC_ENV
from app.db.base import utcnow

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 5.0
TIMER_SWEEP_INTERVAL = 10.0


class ConsumerHeartbeat(bootsteps.StartStopStep):
    """Touches a file from the consumer's own event loop.

    A worker whose consumer stopped (celery/celery#8082: silent after a Redis reconnect)
    stops touching it, which `celery inspect ping` cannot see.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path: Path = parent.app.conf.taskdock_heartbeat_file
        self.tref: Any = None
        self.consumer: Any = None
        self.record: WorkerRecorder | None = None

    def start(self, parent: Any) -> None:
        self.consumer = parent
        self.record = WorkerRecorder(
            name=str(parent.hostname),
            queues=[queue.name for queue in parent.app.amqp.queues.consume_from.values()],
            concurrency=int(getattr(parent.controller, "concurrency", 0) or 0),
        )
        # The first beat when the consumer is ready ("celery@host ready."), not now: this step
        # starts before the consumer subscribes, and the first timed beat is 5 s away.
        signals.worker_ready.connect(self._on_ready, sender=parent, weak=False)
        self.tref = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL, self._beat, (), priority=10)

    def _on_ready(self, **_: Any) -> None:
        self._beat()

    def stop(self, parent: Any) -> None:
        signals.worker_ready.disconnect(self._on_ready, sender=parent)
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        self.path.unlink(missing_ok=True)
        if self.record is not None:
            self.record.forget()

    def _consuming(self) -> bool:
        """The loop runs, and it is connected and subscribed to its queues."""
        consumer = getattr(self, "consumer", None)
        if consumer is None:
            return True
        connection = getattr(consumer, "connection", None)
        task_consumer = getattr(consumer, "task_consumer", None)
        if connection is None or not connection.connected or task_consumer is None:
            return False
        active = getattr(task_consumer, "_active_tags", None)
        return active is None or bool(active)

    def _beat(self) -> None:
        if not self._consuming():
            logger.warning("the worker is not consuming; heartbeat withheld")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            # prometheus-client opens a file there for each new pool process: a folder deleted
            # under the worker (its data directory, in `taskdock dev`) must exist again by then.
            metrics_dir = os.environ.get(MULTIPROC_ENV)
            if metrics_dir:
                os.makedirs(metrics_dir, exist_ok=True)
        except OSError:
            logger.warning("cannot write the worker heartbeat", extra={"path": str(self.path)})
        if self.record is not None:
            self.record.beat()


class WorkerRecorder:
    """Writes this worker's row in the registry (`app.workers`) off the event loop.

    The consumer's loop must not wait on the database: each beat hands the write to a thread,
    and skips it while the previous one still runs (a database that hangs costs one thread).
    """

    def __init__(self, *, name: str, queues: list[str], concurrency: int) -> None:
        self.name = name
        self.queues = queues
        self.concurrency = concurrency
        self.started_at = utcnow()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._first = True

    def beat(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._thread = threading.Thread(target=self._write, name="worker-record", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        from app.core.db import session_scope
        from app.workers import service

        try:
            with session_scope() as session:
                if self._first:
                    service.forget(session=session)
                service.beat(
                    session=session,
                    name=self.name,
                    queues=self.queues,
                    concurrency=self.concurrency,
                    pid=os.getpid(),
                    started_at=self.started_at,
                )
        except Exception as exc:
            if not self._failing:
                logger.warning("cannot record the worker", extra={"reason": str(exc)[:200]})
            self._failing = True
            return
        self._first = self._failing = False

    def forget(self) -> None:
        """A worker that stops takes its row with it; a killed one's row goes stale."""
        if self._thread is not None:
            self._thread.join(timeout=5)
        from app.core.db import session_scope
        from app.workers import service

        try:
            with session_scope() as session:
                service.forget(session=session, name=self.name)
        except Exception as exc:
            logger.warning("cannot remove the worker's record", extra={"reason": str(exc)[:200]})


def sweep_cancelled(timer: Timer) -> int:
    """Drop the cancelled entries from `timer`'s heap; returns how many went.

    The list is changed in place: the event loop iterates the timer through a generator that
    holds this very list, and it reads the heap afresh after every entry it runs.
    """
    queue = timer._queue
    live = [event for event in queue if not event.entry.canceled]
    dropped = len(queue) - len(live)
    if dropped:
        heapq.heapify(live)
        queue[:] = live
    return dropped


class TimerSweep(bootsteps.StartStopStep):
    """Keeps the worker's timer as long as the work in flight, not as the time limit.

    The prefork pool puts a time-limit entry on the event loop's timer for every task it starts
    (asynpool's on_timeout_set). When the task ends first the entry is only marked cancelled,
    and kombu's heap holds it until it falls due, a whole time limit later (celery/celery#5200).
    At a few hundred tasks a second and the default 300 s limit, that is ~100,000 dead entries
    of ~450 bytes in the worker's main process; with a limit of an hour, hundreds of MB.
    Sweeping them every few seconds bounds the heap by the tasks started in one interval.
    """

    requires = ("celery.worker.components:Hub",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def include_if(self, parent: Any) -> bool:
        # Only the event loop's timer (prefork) runs its entries on the thread that sweeps it.
        return bool(parent.use_eventloop)

    def start(self, parent: Any) -> None:
        self.tref = parent.timer.call_repeatedly(
            TIMER_SWEEP_INTERVAL, sweep_cancelled, (parent.timer,), priority=10
        )

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def install_worker_hooks(app: Celery, settings: Settings) -> None:
    app.conf.taskdock_heartbeat_file = settings.worker_heartbeat_file
    app.steps["consumer"].add(ConsumerHeartbeat)
    app.steps["worker"].add(TimerSweep)

    @signals.setup_logging.connect(weak=False)
    def _logging(**_: Any) -> None:
        # Connecting this signal stops Celery from configuring logging its own way.
        configure_logging(level=settings.log_level, fmt=settings.log_format)
        warn_unknown_variables()

    @signals.worker_init.connect(weak=False)
    def _built(**_: Any) -> None:
        # Before the pool's children are forked: they inherit what it froze
        # (app/core/collector.py).
        collector.resume()

    @signals.worker_init.connect(weak=False)
    def _serve_metrics(**_: Any) -> None:
        if not settings.worker_metrics_port:
            return
        from prometheus_client import start_http_server

        from app.core.metrics import collecting_registry

        try:
            start_http_server(
                settings.worker_metrics_port,
                addr=settings.worker_metrics_host,
                registry=collecting_registry(),
            )
        except OSError as exc:
            logger.warning(
                "worker metrics not served",
                extra={"port": settings.worker_metrics_port, "reason": str(exc)},
            )
            return
        logger.info(
            "worker metrics served",
            extra={"host": settings.worker_metrics_host, "port": settings.worker_metrics_port},
        )

    @signals.worker_process_init.connect(weak=False)
    def _pool_process_up(**_: Any) -> None:
        from app.core import metrics

        metrics.PROCESSES.labels("worker").set(1)
