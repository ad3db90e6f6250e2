"""Task types used only by the tests, loaded through TASKDOCK_TASK_MODULES."""

from __future__ import annotations

import gc
import os
import signal
import time
from datetime import timedelta

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ConfigDict

from app.tasks.registry import RetryPolicy, TaskContext, task_type


class FlakyInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fail_times: int


class FlakyError(RuntimeError):
    pass


@task_type(
    "tests.flaky",
    input=FlakyInput,
    retry=RetryPolicy(max_retries=2, backoff=0.2, backoff_max=0.5),
)
def flaky(payload: FlakyInput, ctx: TaskContext) -> dict[str, int]:
    """Fails on its first `fail_times` attempts."""
    if ctx.attempt <= payload.fail_times:
        raise FlakyError(f"failing attempt {ctx.attempt}")
    return {"attempt": ctx.attempt}


class CrashInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


@task_type("tests.crash", input=CrashInput)
def crash(payload: CrashInput, ctx: TaskContext) -> None:
    """Kills its own process, as the OOM killer would: a poison task."""
    os.kill(os.getpid(), signal.SIGKILL)


class NoRetryError(ValueError):
    pass


@task_type(
    "tests.no_retry",
    input=CrashInput,
    retry=RetryPolicy(max_retries=3, retry_on=(ConnectionError,)),
)
def no_retry(payload: CrashInput, ctx: TaskContext) -> None:
    """Raises an error outside its retry_on list: fails at once."""
    raise NoRetryError("not retryable")


class BadOutputInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StrictOutput(BaseModel):
    count: int


@task_type("tests.bad_output", input=BadOutputInput, output=StrictOutput)
def bad_output(payload: BadOutputInput, ctx: TaskContext) -> dict[str, str]:
    """Returns what its output model refuses."""
    return {"count": "many"}


class SlowInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float
    ignore_soft_limit: bool = False


@task_type("tests.slow", input=SlowInput, retry=RetryPolicy(max_retries=0), time_limit=1)
def slow(payload: SlowInput, ctx: TaskContext) -> None:
    """Overruns its 1-second time limit; may even ignore the soft limit."""
    deadline = time.monotonic() + payload.seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            if not payload.ignore_soft_limit:
                raise


class SideInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: int = 0


@task_type("tests.side", input=SideInput, queue="side")
def side(payload: SideInput, ctx: TaskContext) -> dict[str, int]:
    """Runs on a queue of its own, as a user's task type with `queue=` does."""
    return {"value": payload.value}


class UnstorableInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str


@task_type("tests.unstorable", input=UnstorableInput)
def unstorable(payload: UnstorableInput, ctx: TaskContext) -> object:
    """Returns what no JSON column can hold: bytes, or a NaN."""
    return b"\x00raw" if payload.kind == "bytes" else {"ratio": float("nan")}


class FetchedRecord(BaseModel):
    count: int


@task_type(
    "tests.validates_fetched",
    input=BadOutputInput,
    retry=RetryPolicy(max_retries=3, backoff=0.05, backoff_max=0.1, retry_on=(Exception,)),
)
def validates_fetched(payload: BadOutputInput, ctx: TaskContext) -> None:
    """Validates data it fetched, which is wrong: its own ValidationError, retried by policy."""
    FetchedRecord.model_validate({"count": "many"})


class BigResultInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int


@task_type("tests.big_result", input=BigResultInput)
def big_result(payload: BigResultInput, ctx: TaskContext) -> dict[str, str]:
    """Returns a result whose JSON is `size` bytes and a few more."""
    return {"data": "x" * payload.size}


@task_type(
    "tests.short_lived",
    input=CrashInput,
    retention={"SUCCEEDED": timedelta(hours=1), "FAILED": None},
)
def short_lived(payload: CrashInput, ctx: TaskContext) -> None:
    """Keeps its own retention: SUCCEEDED records for an hour, FAILED ones forever."""


@task_type("tests.collector", input=CrashInput)
def collector(payload: CrashInput, ctx: TaskContext) -> dict[str, object]:
    """The garbage collector's state in the pool process that runs it (app/core/collector.py)."""
    return {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "pid": os.getpid()}
