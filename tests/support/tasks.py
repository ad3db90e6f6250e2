"""Task types used only by the tests, loaded through TASKDOCK_TASK_MODULES."""

from __future__ import annotations

import os
import signal
import time

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
