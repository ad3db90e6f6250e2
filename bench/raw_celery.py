"""The baseline: plain Celery on the same broker, configured like taskdock's own Celery app.

The settings that shape the hot path (MIRRORED) are read from app/core/celery.py's
create_celery_app at start-up, so the baseline follows any change made there; the report
records their values. The worker gets the same flags (bench.common.worker_flags).
Not mirrored, being part of what taskdock adds: its per-message time limits, headers and
ids, and its heartbeat bootstep.

The same app is also the peers: Celery with one of its own result backends. At start-up
BENCH_RESULT_BACKEND (a result backend URL) switches results on (result_settings), and
BENCH_RAW_NAME gives the worker's queue and hostname, so raw Celery and its peers can wait
side by side on one broker, each for its own turn.

    python -m bench.raw_celery produce N         enqueue N no-ops with .delay()
    python -m bench.raw_celery pace RATE SECONDS MAX_LAG   .delay() stamp tasks at a steady rate
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery, signals

from app.core.celery import create_celery_app
from app.core.config import Settings

COUNT_KEY = "raw:count"
FIRST_KEY = "raw:first"
DONE_KEY = "raw:done"
LATENCY_KEY = "bench:latency"
MIRRORED = (
    "task_serializer",
    "accept_content",
    "result_serializer",
    "result_backend",
    "task_ignore_result",
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_acks_on_failure_or_timeout",
    "worker_prefetch_multiplier",
    "worker_send_task_events",
    "task_send_sent_event",
    "task_create_missing_queues",
    "task_queue_max_priority",
    "task_default_priority",
    "broker_connection_retry_on_startup",
    "broker_connection_timeout",
    "broker_transport_options",
    "broker_pool_limit",
    "timezone",
    "enable_utc",
)


def mirrored_settings(broker: str) -> dict[str, Any]:
    """taskdock's values of the MIRRORED settings for this broker."""
    conf = create_celery_app(Settings(broker_url=broker)).conf
    return {key: conf[key] for key in MIRRORED}


def result_settings(backend: str | None) -> dict[str, Any]:
    """What a peer changes in the mirrored settings: Celery records each result in `backend`.

    The SQL backend (`db+postgresql+psycopg://`) also records the start, as taskdock records
    RUNNING; the Redis backend keeps Celery's default, the result only.
    """
    if not backend:
        return {}
    return {
        "result_backend": backend,
        "task_ignore_result": False,
        "task_track_started": backend.startswith("db+"),
    }


def queue(name: str) -> str:
    """The queue of the raw worker or peer called `name` (its hostname is `name@bench`)."""
    return f"bench.{name}"


BROKER = os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("baseline", broker=BROKER)
app.conf.update(
    task_default_queue=queue(os.environ.get("BENCH_RAW_NAME", "raw")),
    worker_hijack_root_logger=False,
    **mirrored_settings(BROKER),
)
app.conf.update(result_settings(os.environ.get("BENCH_RESULT_BACKEND")))


@lru_cache
def counters() -> Any:
    import redis

    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@app.task(name="raw.noop")
def noop(target: int) -> None:
    """Counts itself, so the benchmark sees the queue drained: one INCR per task."""
    done = counters().incr(COUNT_KEY)
    if done == 1:
        counters().set(FIRST_KEY, time.time())
    if done == target:
        counters().rpush(DONE_KEY, time.time())


@app.task(name="raw.stamp")
def stamp(sent_at: float) -> None:
    counters().rpush(LATENCY_KEY, time.time() - sent_at)


@signals.worker_ready.connect
def _ready(**_: Any) -> None:
    ready = os.environ.get("BENCH_READY_FILE")
    if ready:
        Path(ready).touch()


def produce(count: int) -> dict[str, float]:
    started = time.perf_counter()
    for _ in range(count):
        noop.delay(count)
    elapsed = time.perf_counter() - started
    times = os.times()
    return {"seconds": elapsed, "cpu": times.user + times.system}


def pace(rate: float, seconds: float, max_lag: float) -> dict[str, float]:
    """Open loop: each send is due at start + i/rate; latency counts from when it was due."""
    total = int(rate * seconds)
    noop.delay(-1)  # connect first; it counts toward nothing
    wall0, mono0 = time.time(), time.monotonic()
    sent = 0
    lagged = False
    for number in range(total):
        due = number / rate
        pause = due - (time.monotonic() - mono0)
        if pause > 0:
            time.sleep(pause)
        elif -pause > max_lag:
            lagged = True
            break
        stamp.delay(wall0 + due)
        sent += 1
    elapsed = time.monotonic() - mono0
    return {"sent": sent, "seconds": elapsed, "lagged": float(lagged)}


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "produce":
        out = produce(int(args[0]))
    elif command == "pace":
        out = pace(float(args[0]), float(args[1]), float(args[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
