"""End-to-end's floor, the worker side: what a durable, recorded task costs here at the least.

bench.submit_floor_app records each submission (group commit) and publishes its Celery message,
taskdock's own (the job `taskdock.execute` with the task's id and attempt, the type as its
shadow), to a queue of its own. This module is the Celery app a plain worker runs those with
(`celery -A bench.e2e_floor worker`, the benchmark's worker flags): per message the claim
(UPDATE ... RETURNING the type and payload, its commit not waiting for the WAL flush, as
taskdock's claim) and the durable outcome, on a psycopg connection of the pool process, with
statements prepared once; a bench.stamp task records its dispatch latency as taskdock's does.
Nothing else taskdock does per task: no lease, no run history, no payload validation, no
retries, no metrics, no log context, no time limits.

The two served together, loaded as taskdock is, give the end-to-end throughput (metric 2) and
dispatch latency (metric 3) that FastAPI, psycopg and Celery allow a durable, recorded task on
this machine; taskdock's ÷ theirs is what taskdock adds.
"""

from __future__ import annotations

import os
import time

from bench.raw_celery import LATENCY_KEY, counters, record_connection
from bench.submit_floor_app import celery as app

__all__ = ["app"]

CLAIM = (
    "UPDATE task SET status = 'RUNNING', deliveries = deliveries + 1, worker = 'floor',"
    " started_at = now(), updated_at = now() WHERE id = %s AND status = 'QUEUED'"
    " RETURNING type, payload"
)
# Durable in the same round trip, as taskdock's outcome (app.tasks.lifecycle's _DURABLE).
FINISH = (
    "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true))"
    " UPDATE task SET status = 'SUCCEEDED', finished_at = now(), updated_at = now(),"
    " result = 'null' FROM durable WHERE id = %s AND status = 'RUNNING'"
)
DATABASE_URL = os.environ["TASKDOCK_DATABASE_URL"]


@app.task(name="taskdock.execute")
def execute(task_id: str, attempt: int) -> None:
    connection = record_connection(DATABASE_URL)
    claimed = connection.execute(CLAIM, (task_id,), prepare=True).fetchone()
    if claimed is None:
        return  # not queued: a duplicate delivery
    type_, payload = claimed
    if type_ == "bench.stamp":
        counters().rpush(LATENCY_KEY, time.time() - payload["sent_at"])
    connection.execute(FINISH, (task_id,), prepare=True)
