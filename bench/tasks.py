"""taskdock task types for the benchmarks, loaded with TASKDOCK_TASK_MODULES=bench.tasks."""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from app.tasks.registry import RetryPolicy, TaskContext, task_type

LATENCY_KEY = "bench:latency"


class NoopInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


@task_type("bench.noop", input=NoopInput, retry=RetryPolicy(max_retries=0))
def noop(payload: NoopInput, ctx: TaskContext) -> None:
    """Does nothing: the record reaching SUCCEEDED is the whole cost being measured."""


class StampInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sent_at: float


@lru_cache
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])


@task_type("bench.stamp", input=StampInput, retry=RetryPolicy(max_retries=0))
def stamp(payload: StampInput, ctx: TaskContext) -> None:
    """Records seconds from the scheduled submission to this start, as the raw baseline does."""
    _redis().rpush(LATENCY_KEY, time.time() - payload.sent_at)
