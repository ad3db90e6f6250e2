"""Prometheus metrics for every process role.

Several processes share one set of numbers (uvicorn workers, Celery's prefork pool), so
prometheus-client runs in multiprocess mode with a fresh directory per process group (see
`app.core.multiproc`). Live-gauge files of dead processes are removed when found, so a
restarted process never counts twice (trallnag/prometheus-fastapi-instrumentator#50).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

from app.core.multiproc import MULTIPROC_ENV, pid_alive

_PID_FILE = re.compile(r"_(\d+)\.db$")


def mark_dead_processes() -> None:
    """Drop the live-gauge files of processes that are gone (uvicorn has no exit hook)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return
    pids = {
        int(m.group(1)) for f in Path(directory).glob("*.db") if (m := _PID_FILE.search(f.name))
    }
    for pid in pids:
        if not pid_alive(pid):
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


class _LiveProcesses(Collector):
    """The group's numbers, after forgetting the live gauges of processes that died."""

    def __init__(self, directory: str) -> None:
        self.inner = multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call]
            None, path=directory
        )

    def collect(self) -> Iterable[Metric]:
        mark_dead_processes()
        metrics: Iterable[Metric] = self.inner.collect()  # type: ignore[no-untyped-call]
        return metrics


def collecting_registry() -> CollectorRegistry:
    """What /metrics reports: every process of the group, or this process alone."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        registry = CollectorRegistry()
        registry.register(_LiveProcesses(directory))
        return registry
    return REGISTRY


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

HTTP_REQUESTS = Counter(
    "taskdock_http_requests_total",
    "HTTP requests by method, route template and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "taskdock_http_request_duration_seconds",
    "HTTP request latency by method and route template.",
    ["method", "route"],
    buckets=LATENCY_BUCKETS,
)
HTTP_IN_PROGRESS = Gauge(
    "taskdock_http_requests_in_progress",
    "HTTP requests being served.",
    ["method"],
    multiprocess_mode="livesum",
)
PROCESSES = Gauge(
    "taskdock_processes",
    "Live processes by role (API server workers, worker pool processes).",
    ["role"],
    multiprocess_mode="livesum",
)

TASKS_SUBMITTED = Counter("taskdock_tasks_submitted_total", "Tasks accepted.", ["type"])
TASKS_STARTED = Counter("taskdock_tasks_started_total", "Runs started.", ["type"])
TASKS_SUCCEEDED = Counter("taskdock_tasks_succeeded_total", "Tasks succeeded.", ["type"])
TASKS_FAILED = Counter("taskdock_tasks_failed_total", "Tasks failed for good.", ["type"])
TASKS_RETRIED = Counter("taskdock_tasks_retried_total", "Failed runs scheduled again.", ["type"])
TASKS_CANCELLED = Counter("taskdock_tasks_cancelled_total", "Tasks cancelled.", ["type"])
TASK_RUN_SECONDS = Histogram(
    "taskdock_task_run_seconds", "Run time of one run.", ["type"], buckets=TASK_BUCKETS
)
TASK_QUEUE_WAIT_SECONDS = Histogram(
    "taskdock_task_queue_wait_seconds",
    "From due (created, countdown or backoff over) to started.",
    ["type"],
    buckets=TASK_BUCKETS,
)

DB_QUERY_SECONDS = Histogram(
    "taskdock_db_query_duration_seconds",
    "Database statement duration by kind.",
    ["statement"],
    buckets=LATENCY_BUCKETS,
)
DB_POOL_IN_USE = Gauge(
    "taskdock_db_pool_connections_in_use",
    "Connections checked out of the pool.",
    multiprocess_mode="livesum",
)
DB_POOL_SIZE = Gauge(
    "taskdock_db_pool_size",
    "Configured pool size, summed over live processes.",
    multiprocess_mode="livesum",
)
TASKS_PURGED = Counter(
    "taskdock_tasks_purged_total",
    "Finished task records deleted by the retention purge, by final status.",
    ["status"],
)
