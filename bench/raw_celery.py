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

BENCH_RECORD_URL (a PostgreSQL URL) makes the peer that is issue 13's minimal prototype of a
recorded run: each task makes the two writes a taskdock run makes, a claim (committed without
waiting for the WAL flush, as taskdock's worker does) and a durable outcome, on a psycopg
connection of the worker process, and nothing else taskdock does. Its rate is the floor that
two round trips per task allow.

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


RECORD_URL = os.environ.get("BENCH_RECORD_URL")
RECORD_TABLE = """CREATE TABLE IF NOT EXISTS bench_record (
    id integer PRIMARY KEY, status text NOT NULL, deliveries integer NOT NULL DEFAULT 0,
    worker text, started_at timestamptz, finished_at timestamptz, result json)"""
CLAIM = (
    "UPDATE bench_record SET status = 'RUNNING', deliveries = deliveries + 1, worker = %s,"
    " started_at = now() WHERE id = %s AND status = 'QUEUED'"
)
# As taskdock's outcome: durable in the same round trip (app.tasks.lifecycle's _DURABLE).
FINISH = (
    "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true))"
    " UPDATE bench_record SET status = 'SUCCEEDED', finished_at = now(), result = 'null'"
    " FROM durable WHERE id = %s AND status = 'RUNNING'"
)
_record: dict[int, Any] = {}


def record_connection(url: str | None = RECORD_URL) -> Any:
    """This process's own connection to `url` (each prefork child opens its own); its commits
    do not wait for the WAL flush unless a statement asks (FINISH)."""
    import psycopg

    found = _record.get(os.getpid())
    if found is None:
        dsn = str(url).replace("postgresql+psycopg://", "postgresql://", 1)
        found = _record[os.getpid()] = psycopg.connect(
            dsn, autocommit=True, options="-c synchronous_commit=off"
        )
    return found


@app.task(name="raw.noop")
def noop(target: int, number: int = -1) -> None:
    """Counts itself, so the benchmark sees the queue drained: one INCR per task. The
    recorded peer first claims and finishes its row."""
    if RECORD_URL and number >= 0:
        connection = record_connection()
        connection.execute(CLAIM, ("bench", number), prepare=True)
        connection.execute(FINISH, (number,), prepare=True)
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
    if RECORD_URL:
        # The rows the recorded peer's tasks claim, written before the clock starts (taskdock's
        # are written by its submissions, outside the drain it is compared with).
        connection = record_connection()
        connection.execute(RECORD_TABLE)
        connection.execute("TRUNCATE bench_record")
        connection.execute(
            "INSERT INTO bench_record (id, status)"
            " SELECT n, 'QUEUED' FROM generate_series(0, %s) AS n",
            (count - 1,),
        )
    started = time.perf_counter()
    for number in range(count):
        noop.delay(count, number)
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
