"""Run one delivery of one attempt: claim the record, keep the lease, write the outcome."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    StatementError,
)

from app.core import metrics
from app.core.config import Settings
from app.core.db import EncodedJSON, json_dumps, statement_scope
from app.core.logging import log_context
from app.db.base import utcnow
from app.tasks import lifecycle, recovery
from app.tasks.exceptions import ResultTooLarge
from app.tasks.registry import TaskContext, TaskType, UnknownTaskType, get_task_type
from app.tasks.states import TaskStatus

logger = logging.getLogger(__name__)


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    RETRYING = "retrying"
    FAILED = "failed"
    STALE = "stale"  # the message was for a finished, cancelled, held or older attempt
    LOST = "lost"  # the run lost its lease while running; its result was discarded


@dataclass(frozen=True, slots=True)
class Ended:
    """How one delivery ended; a failure carries the error written to the record and its cause."""

    outcome: Outcome
    error: dict[str, Any] | None = None
    cause: BaseException | None = None
    retry_in: float | None = None  # RETRYING: seconds until the next attempt is due


# The endings without an error, made once: most deliveries end in one of these.
_ENDED = {outcome: Ended(outcome) for outcome in Outcome}

_OUTCOME_COUNTERS = {
    Outcome.SUCCEEDED: metrics.TASKS_SUCCEEDED,
    Outcome.FAILED: metrics.TASKS_FAILED,
    Outcome.RETRYING: metrics.TASKS_RETRIED,
}


@dataclass
class _Run:
    claim: lifecycle.Claim
    ctx: TaskContext
    lease_seconds: float
    renew_at: float = 0.0

    @property
    def period(self) -> float:
        """How often its lease is renewed: a third of it, so that two renewals may fail (a
        database restart) before it runs out."""
        return self.lease_seconds / 3


class LeaseRenewer:
    """One thread per worker process extends the leases of every run in that process.

    A run shorter than a third of the lease is never renewed and costs no thread: most tasks
    finish long before their first renewal, and starting a thread per task was a measurable
    share of the worker's bookkeeping. Forked pool children each start their own thread.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[uuid.UUID, int, int], _Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid: int | None = None
        # When the thread will next look on its own: a run due later needs no wake-up, and
        # waking a thread for every task was a context switch per task.
        self._next_look = 0.0
        # How long the thread sleeps with no run to renew: a third of the shortest lease seen,
        # so that a new run (due a third of its lease from now) never falls before its next look.
        # Sleeping longer made every short task wake it: a run ends before its outcome is
        # written, the thread then found nothing held and went back to sleep for a minute.
        self._idle_wait = 60.0

    @contextlib.contextmanager
    def hold(
        self, *, claim: lifecycle.Claim, ctx: TaskContext, lease_seconds: float
    ) -> Iterator[None]:
        key = (claim.task_id, claim.attempt, claim.delivery)
        run = _Run(claim, ctx, lease_seconds)
        run.renew_at = time.monotonic() + run.period
        with self._lock:
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._loop, name="lease-renewer", daemon=True).start()
            self._runs[key] = run
            self._idle_wait = min(self._idle_wait, run.period)
            wake = run.renew_at < self._next_look
        if wake:
            self._wake.set()
        try:
            yield
        finally:
            # Whatever ends the run (even SystemExit in a thread pool), its lease stops here.
            with self._lock:
                self._runs.pop(key, None)

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            with self._lock:
                due = [run for run in self._runs.values() if run.renew_at <= time.monotonic()]
            for run in due:
                run.renew_at = time.monotonic() + run.period
                self._renew(run)
            with self._lock:
                next_at = min((run.renew_at for run in self._runs.values()), default=None)
                wait = self._idle_wait if next_at is None else max(0.01, next_at - time.monotonic())
                self._next_look = time.monotonic() + wait
            self._wake.wait(wait)

    def _renew(self, run: _Run) -> None:
        try:
            with statement_scope() as session:
                held = lifecycle.renew_lease(
                    session=session, claim=run.claim, lease_seconds=run.lease_seconds
                )
        except Exception:
            # The database is away; the lease may run out and the task be handed out again.
            logger.warning("lease renewal failed", exc_info=True)
            return
        if not held:
            logger.info(
                "lease lost: the task was cancelled or handed to another worker",
                extra={"task_id": str(run.claim.task_id), "attempt": run.claim.attempt},
            )
            run.ctx.cancel()


_renewer = LeaseRenewer()


def execute(*, task_id: uuid.UUID, attempt: int, worker: str, settings: Settings) -> Ended:
    with statement_scope() as session:
        claim = lifecycle.claim(
            session=session,
            task_id=task_id,
            attempt=attempt,
            worker=f"{worker}:{os.getpid()}",
            lease_seconds=settings.task_lease_seconds,
        )
    if claim is None:
        logger.info("stale delivery skipped")
        return _ENDED[Outcome.STALE]
    token = log_context.set(
        {**(log_context.get() or {}), "task_type": claim.type, "attempt": attempt}
    )
    metrics.TASKS_STARTED.labels(claim.type).inc()
    metrics.TASK_QUEUE_WAIT_SECONDS.labels(claim.type).observe(
        max(0.0, (utcnow() - claim.run_after).total_seconds())
    )
    started = time.perf_counter()
    try:
        ended = _run(claim=claim, settings=settings)
    finally:
        log_context.reset(token)
    metrics.TASK_RUN_SECONDS.labels(claim.type).observe(time.perf_counter() - started)
    counter = _OUTCOME_COUNTERS.get(ended.outcome)
    if counter is not None:
        counter.labels(claim.type).inc()
    return ended


def _run(*, claim: lifecycle.Claim, settings: Settings) -> Ended:
    lost_runs = claim.delivery - 1  # this claim's delivery is the first not yet lost
    if recovery.lost_too_often(lost_runs, max_deliveries=settings.task_max_deliveries):
        # Every earlier delivery of this attempt died with its worker: a poison task.
        reason = recovery.worker_lost(lost_runs)
        _write_outcome(
            lambda session: lifecycle.give_up(session=session, claim=claim, reason=reason),
            patience=settings.task_lease_seconds,
        )
        logger.error("poison task failed after repeated worker loss")
        return Ended(Outcome.FAILED, error={"type": "WorkerLost", "message": reason})

    try:
        task_type = get_task_type(claim.type)
    except UnknownTaskType as exc:
        return _record_failure(
            claim=claim, exc=exc, task_type=None, patience=settings.task_lease_seconds
        )

    ctx = TaskContext(task_id=str(claim.task_id), attempt=claim.attempt, delivery=claim.delivery)
    logger.info("task started")
    try:
        payload = task_type.validate_payload(claim.payload)
    except ValidationError as exc:
        # The payload the record holds does not fit the type: no run makes it fit.
        return _record_failure(
            claim=claim, exc=exc, task_type=None, patience=settings.task_lease_seconds
        )
    try:
        with _renewer.hold(claim=claim, ctx=ctx, lease_seconds=settings.task_lease_seconds):
            # The task's own exceptions, a ValidationError of data it fetched included, follow
            # its retry policy.
            value = task_type.func(payload, ctx)
    except Exception as exc:
        if ctx.cancelled:
            return _ENDED[Outcome.LOST]
        return _record_failure(
            claim=claim, exc=exc, task_type=task_type, patience=settings.task_lease_seconds
        )
    if ctx.cancelled:
        logger.info("result discarded: the run lost its lease")
        return _ENDED[Outcome.LOST]
    try:
        result = encode_result(task_type.dump_result(value), limit=settings.result_max_bytes)
        written = _write_outcome(
            lambda session: lifecycle.succeed(session=session, claim=claim, result=result),
            patience=settings.task_lease_seconds,
        )
    except ResultTooLarge as exc:
        # The same code would return the same result: final at once, whatever the retry policy.
        return _record_failure(
            claim=claim, exc=exc, task_type=None, patience=settings.task_lease_seconds
        )
    except (StatementError, TypeError, ValueError) as exc:
        # A result its output model refuses (pydantic's ValidationError is a ValueError), or one
        # JSON cannot hold (bytes, NaN), refused by SQLAlchemy or by the driver as it encodes
        # it: the same code would return the same value again, so the task fails now.
        if isinstance(exc, DBAPIError) and not isinstance(exc, DataError):
            raise  # the database is away, not the value: the message goes back (jobs.py)
        cause = exc.orig if isinstance(exc, StatementError) and exc.orig else exc
        return _record_failure(
            claim=claim,
            exc=cause,
            task_type=None,
            context="the result cannot be stored",
            patience=settings.task_lease_seconds,
        )
    if not written:
        logger.info("result discarded: a newer run or a cancel owns the record")
        return _ENDED[Outcome.LOST]
    logger.info("task succeeded")
    return _ENDED[Outcome.SUCCEEDED]


def encode_result(result: Any, *, limit: int) -> EncodedJSON | None:
    """The result's JSON, made here once (the write sends it as it is) to measure it against
    `limit` bytes; ResultTooLarge past it. ValueError or TypeError for what JSON cannot hold."""
    if result is None:
        return None  # written as before: no value
    encoded = EncodedJSON(json_dumps(result))
    if len(encoded) > limit:  # ASCII-only JSON: characters are bytes
        raise ResultTooLarge(size=len(encoded), limit=limit)
    return encoded


T = TypeVar("T")
OUTCOME_RETRY_PAUSE = 0.25


def _write_outcome(write: Callable[[lifecycle.Executor], T], *, patience: float) -> T:
    """Write a run's outcome, waiting up to `patience` seconds for a database that is away.

    The run is done and its result is in hand: a database restart must not throw it away.
    Handing the message back instead (jobs.py does, once patience runs out) would find the
    record still RUNNING under this run's lease, and the task would wait for the reaper.
    """
    deadline = time.monotonic() + patience
    pause = OUTCOME_RETRY_PAUSE
    while True:
        try:
            with statement_scope() as session:
                return write(session)
        except (OperationalError, InterfaceError) as exc:
            if time.monotonic() + pause > deadline:
                raise
            logger.warning(
                "database unavailable; the outcome is written when it answers",
                extra={"reason": str(exc).splitlines()[0][:200]},
            )
            time.sleep(pause)
            pause = min(pause * 2, 4.0)


def _record_failure(
    *,
    claim: lifecycle.Claim,
    exc: BaseException,
    task_type: TaskType | None,
    patience: float,
    context: str | None = None,
) -> Ended:
    """Write the failed run; retried only when `task_type`'s policy covers `exc`."""
    retry_in: float | None = None
    if task_type is not None and isinstance(exc, task_type.retry.retry_on):
        retry_in = task_type.retry.delay(claim.attempt)
    error: dict[str, Any] = lifecycle.error_record(exc)
    if context:
        error["message"] = f"{context}: {error['message']}"[: lifecycle.MESSAGE_LIMIT]
    status = _write_outcome(
        lambda session: lifecycle.fail(
            session=session, claim=claim, error=error, retry_in=retry_in
        ),
        patience=patience,
    )
    if status is None:
        return _ENDED[Outcome.LOST]
    logger.warning(
        "task failed",
        extra={"error_type": error["type"], "will_retry": status is TaskStatus.RETRYING},
    )
    outcome = Outcome.RETRYING if status is TaskStatus.RETRYING else Outcome.FAILED
    return Ended(outcome, error=error, cause=exc, retry_in=retry_in)
