"""Worker-process wiring: logging, a consumer heartbeat file, the health check that reads it,
and a sweep of the event loop's timer."""

from __future__ import annotations

import heapq
import logging
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps, signals
from kombu.asynchronous.timer import Timer

from app.core.config import Settings
from app.core.logging import configure_logging

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

    def start(self, parent: Any) -> None:
        self.consumer = parent
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
        except OSError:
            logger.warning("cannot write the worker heartbeat", extra={"path": str(self.path)})


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

    @signals.worker_init.connect(weak=False)
    def _serve_metrics(**_: Any) -> None:
        if not settings.worker_metrics_port:
            return
        from prometheus_client import start_http_server

        from app.core.metrics import collecting_registry

        try:
            start_http_server(settings.worker_metrics_port, registry=collecting_registry())
        except OSError as exc:
            logger.warning(
                "worker metrics not served",
                extra={"port": settings.worker_metrics_port, "reason": str(exc)},
            )
            return
        logger.info("worker metrics served", extra={"port": settings.worker_metrics_port})

    @signals.worker_process_init.connect(weak=False)
    def _pool_process_up(**_: Any) -> None:
        from app.core import metrics

        metrics.PROCESSES.labels("worker").set(1)
