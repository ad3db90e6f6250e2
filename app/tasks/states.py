"""The task state machine: the one place that says which transitions are legal.

    QUEUED ──► RUNNING ──► SUCCEEDED
      │  ▲        │  ├───► FAILED ─────┐
      │  │        │  ├───► RETRYING ──►│─► RUNNING (next attempt, when due)
      │  └────────┘  │                 │
      │  lease lost  └───► CANCELLED ──┤
      └──────────────────► CANCELLED   └─► QUEUED (POST /retry: a new attempt)

QUEUED with `published_at` NULL means "accepted, the broker not told yet": the outbox.
"""

from __future__ import annotations

from enum import StrEnum

from app.core.errors import Conflict


class TaskStatus(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
UNFINISHED = frozenset(TaskStatus) - TERMINAL
# Waiting for a worker: the dispatcher publishes these when due.
WAITING = frozenset({TaskStatus.QUEUED, TaskStatus.RETRYING})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.QUEUED: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED, TaskStatus.FAILED}),
    TaskStatus.RUNNING: frozenset(
        {
            TaskStatus.SUCCEEDED,
            TaskStatus.FAILED,
            TaskStatus.RETRYING,
            TaskStatus.CANCELLED,
            # A redelivery after the worker vanished, or the reaper handing it out again.
            TaskStatus.RUNNING,
            TaskStatus.QUEUED,
        }
    ),
    TaskStatus.RETRYING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    TaskStatus.SUCCEEDED: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.QUEUED}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.QUEUED}),
}


class RunOutcome(StrEnum):
    """How one run (one delivery of one attempt) ended; RUNNING while it runs."""

    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"  # the task's error; its next run, if any, is the next attempt
    CANCELLED = "CANCELLED"
    LOST = "LOST"  # its worker vanished, or its lease ran out and the attempt was handed out again


class IllegalTransition(Conflict):
    code = "illegal_transition"


def sources(target: TaskStatus) -> frozenset[TaskStatus]:
    """Every state a task may leave for `target`; conditional UPDATEs filter on these."""
    return frozenset(state for state, targets in TRANSITIONS.items() if target in targets)


def check_transition(current: TaskStatus, target: TaskStatus) -> None:
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(
            f"a {current.value} task cannot become {target.value}",
            status=current.value,
        )
