"""The chaos task type: every execution leaves a row in a ledger the harness reads afterwards.

The ledger lives in the same database as the task records, written through a connection of
its own, so it shows what really ran even where the task record says otherwise.
"""

from __future__ import annotations

import os
import time

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from app.tasks.registry import RetryPolicy, TaskContext, task_type

LEDGER_DSN_ENV = "CHAOS_LEDGER_DSN"
TASK_TYPE = "chaos.ledger"

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS chaos_ledger (
    id bigserial PRIMARY KEY,
    task_id uuid NOT NULL,
    seq integer NOT NULL,
    attempt integer NOT NULL,
    delivery integer NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    finished_at double precision
)
"""


class LedgerInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seq: int = Field(ge=0)
    sleep_ms: int = Field(ge=0, le=5000)


@task_type(
    TASK_TYPE,
    input=LedgerInput,
    # Faults make runs fail (the ledger's database restarts under them); a generous budget
    # means a FAILED task says the product gave up too early, not that the budget was small.
    retry=RetryPolicy(max_retries=20, backoff=0.5, backoff_max=5.0),
    time_limit=30,
)
def ledger(payload: LedgerInput, ctx: TaskContext) -> dict[str, int]:
    """Record the execution, sleep so it overlaps faults, record its end."""
    with psycopg.connect(os.environ[LEDGER_DSN_ENV], autocommit=True, connect_timeout=2) as conn:
        row = conn.execute(
            "INSERT INTO chaos_ledger (task_id, seq, attempt, delivery, pid, started_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (ctx.task_id, payload.seq, ctx.attempt, ctx.delivery, os.getpid(), time.time()),
        ).fetchone()
        assert row is not None
        ctx.sleep(payload.sleep_ms / 1000)
        conn.execute(
            "UPDATE chaos_ledger SET finished_at = %s WHERE id = %s", (time.time(), row[0])
        )
    return {"seq": payload.seq, "attempt": ctx.attempt}
