"""The task types taskdock ships with."""

from __future__ import annotations

import hashlib

from pydantic import BaseModel, ConfigDict, Field

from app.tasks.registry import RetryPolicy, TaskContext, task_type


class ProcessDataInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: int = Field(ge=0)
    data: str = Field(max_length=100_000)


class ProcessDataOutput(BaseModel):
    user_id: int
    length: int
    words: int
    sha256: str
    processed: str


@task_type("process_data", input=ProcessDataInput, output=ProcessDataOutput, time_limit=60)
def process_data(payload: ProcessDataInput, ctx: TaskContext) -> ProcessDataOutput:
    """Normalise a user's text and return its digest and counts."""
    processed = " ".join(payload.data.split()).upper()
    return ProcessDataOutput(
        user_id=payload.user_id,
        length=len(payload.data),
        words=len(payload.data.split()),
        sha256=hashlib.sha256(payload.data.encode()).hexdigest(),
        processed=processed,
    )


class SleepInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(ge=0, le=300)
    fail: bool = Field(default=False, description="Raise after sleeping (tests the retry policy).")


class SleepOutput(BaseModel):
    slept: float
    attempt: int


class SleepFailed(RuntimeError):
    """Raised by `sleep` when asked to fail."""


@task_type(
    "sleep",
    input=SleepInput,
    output=SleepOutput,
    retry=RetryPolicy(max_retries=2, backoff=0.5, backoff_max=5),
    time_limit=310,
)
def sleep(payload: SleepInput, ctx: TaskContext) -> SleepOutput:
    """Sleep for a while (demos, tests and benchmarks); stops early when cancelled."""
    ctx.sleep(payload.seconds)
    if payload.fail:
        raise SleepFailed(f"asked to fail on attempt {ctx.attempt}")
    return SleepOutput(slept=payload.seconds, attempt=ctx.attempt)
