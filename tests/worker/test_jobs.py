"""The Celery state of a run follows its record: SUCCESS, FAILURE with the error, or RETRY."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.exceptions import Retry

from app.db.base import utcnow
from app.worker.jobs import TaskFailed, celery_state, execute
from app.worker.runner import Ended, Outcome


@pytest.mark.parametrize("outcome", [Outcome.SUCCEEDED, Outcome.STALE, Outcome.LOST])
def test_a_run_with_nothing_left_to_do_is_a_success(outcome: Outcome) -> None:
    assert celery_state(Ended(outcome)) == outcome.value


def test_failed_is_a_failure_with_the_error_and_its_cause() -> None:
    cause = ValueError("bad input")
    error = {"type": "ValueError", "message": "bad input", "traceback": "..."}

    with pytest.raises(TaskFailed, match=r"^ValueError: bad input$") as raised:
        celery_state(Ended(Outcome.FAILED, error=error, cause=cause))

    assert raised.value.__cause__ is cause


def test_a_failure_without_an_exception_names_its_type() -> None:
    error = {"type": "WorkerLost", "message": "the worker was lost 3 times"}

    with pytest.raises(TaskFailed, match=r"^WorkerLost: the worker was lost 3 times$"):
        celery_state(Ended(Outcome.FAILED, error=error))


def test_retrying_is_a_retry_that_publishes_nothing() -> None:
    error = {"type": "ConnectionError", "message": "refused"}

    before = utcnow()
    with pytest.raises(Retry) as raised:
        celery_state(Ended(Outcome.RETRYING, error=error, retry_in=30.0))

    assert isinstance(raised.value.exc, TaskFailed)
    assert str(raised.value.exc) == "ConnectionError: refused"
    due = raised.value.when - before
    assert timedelta(seconds=30) <= due < timedelta(seconds=31)  # when the record is due again
    assert raised.value.sig is None  # a bare Retry: nothing was sent for a later run


def test_the_job_logs_its_failures_as_expected_errors() -> None:
    # Celery logs an exception listed in `throws` in one line, without a traceback.
    assert execute.throws == (TaskFailed,)
