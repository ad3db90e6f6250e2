"""Task types: a decorator binds a name to a function, its input and output models and policies."""

from __future__ import annotations

import importlib
import os
import random
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel

from app.core.config import ConfigError, Settings
from app.core.errors import InvalidInput
from app.tasks.states import TERMINAL, TaskStatus

InputT = TypeVar("InputT", bound=BaseModel)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; `max_retries` counts runs after the first."""

    max_retries: int = 3
    backoff: float = 1.0
    backoff_max: float = 600.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt `attempt + 1`."""
        ceiling: float = min(self.backoff_max, self.backoff * 2.0 ** max(attempt - 1, 0))
        if not self.jitter:
            return ceiling
        # "Equal jitter": never less than half the ceiling, so retries still back off.
        return ceiling / 2 + float(random.uniform(0, ceiling / 2))  # noqa: S311


class TaskContext:
    """What a running task knows about itself: its id, its attempt, and whether to stop."""

    def __init__(self, *, task_id: str, attempt: int, delivery: int) -> None:
        self.task_id = task_id
        self.attempt = attempt
        self.delivery = delivery
        self._stop = threading.Event()

    @property
    def cancelled(self) -> bool:
        """True once the record says this run must stop (cancelled, or its lease lost)."""
        return self._stop.is_set()

    def cancel(self) -> None:
        self._stop.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early if the run is cancelled; returns False when cancelled."""
        return not self._stop.wait(seconds)


@dataclass(frozen=True)
class ScheduleSpec:
    """A schedule declared next to its task type in code; the dispatcher keeps the database's
    copy in step with it at start, by `name` (app/schedules/firing.py)."""

    name: str
    cron: str | None = None
    timezone: str = "UTC"
    interval_seconds: int | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int = 0
    overlap: str = "allow"
    catchup: str = "latest"
    catchup_window_seconds: int = 3600
    # Checked for its form at start; its address, as every webhook's, at each delivery.
    notify_url: str | None = None


def schedule(name: str, **options: Any) -> ScheduleSpec:
    """`@task_type(..., schedules=[schedule("nightly", cron="0 3 * * *", timezone=...)])`."""
    return ScheduleSpec(name=name, **options)


@dataclass(frozen=True)
class TaskType:
    name: str
    func: Callable[[Any, TaskContext], Any]
    input_model: type[BaseModel]
    output_model: type[BaseModel] | None = None
    queue: str = "default"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    time_limit: float | None = None
    description: str = ""
    schedules: tuple[ScheduleSpec, ...] = ()
    # Seconds a finished record of this type is kept, by final status (None: forever); the
    # statuses not named here follow the TASKDOCK_RETENTION_* settings (app.tasks.retention).
    retention: Mapping[TaskStatus, float | None] = field(default_factory=dict)

    @property
    def max_attempts(self) -> int:
        return self.retry.max_retries + 1

    def validate_payload(self, payload: Any) -> BaseModel:
        return self.input_model.model_validate(payload)

    def dump_result(self, value: Any) -> Any:
        if self.output_model is not None:
            return self.output_model.model_validate(value).model_dump(mode="json")
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        return value


_registry: dict[str, TaskType] = {}
# Counts registrations, so what is built from the registry (the /task-types answer) is built
# again only when it has changed.
_version = 0


class UnknownTaskType(InvalidInput):
    code = "unknown_task_type"


def task_type(
    name: str,
    *,
    input: type[InputT],
    output: type[BaseModel] | None = None,
    queue: str = "default",
    retry: RetryPolicy | None = None,
    time_limit: float | None = None,
    schedules: list[ScheduleSpec] | None = None,
    retention: Mapping[str, timedelta | None] | None = None,
) -> Callable[[Callable[[InputT, TaskContext], Any]], Callable[[InputT, TaskContext], Any]]:
    """Register a task type; the function takes the validated input and a TaskContext.

    `schedules` fire it on a cron or an interval with owner "" (see `schedule`). `retention`
    keeps this type's finished records for their own time, by final status, e.g.
    `{"SUCCEEDED": timedelta(hours=1)}` (`None`: kept forever).
    """
    kept = retention_periods(name, retention or {})

    def register(
        func: Callable[[InputT, TaskContext], Any],
    ) -> Callable[[InputT, TaskContext], Any]:
        global _version
        existing = _registry.get(name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"task type {name!r} is registered twice")
        _version += 1
        _registry[name] = TaskType(
            name=name,
            func=func,
            input_model=input,
            output_model=output,
            queue=queue,
            retry=retry or RetryPolicy(),
            time_limit=time_limit,
            retention=kept,
            description=(func.__doc__ or "").strip().splitlines()[0] if func.__doc__ else "",
            schedules=tuple(schedules or ()),
        )
        return func

    return register


def retention_periods(
    name: str, retention: Mapping[str, timedelta | None]
) -> dict[TaskStatus, float | None]:
    """A decorator's `retention` as seconds by final status; a wrong one stops the import."""
    periods: dict[TaskStatus, float | None] = {}
    final = ", ".join(sorted(TERMINAL))
    for key, period in retention.items():
        try:
            status = TaskStatus(key)
        except ValueError:
            status = None
        if status is None or status not in TERMINAL:
            raise ValueError(f"task type {name!r}: retention for {key!r}; use one of {final}")
        if period is not None and (not isinstance(period, timedelta) or period <= timedelta(0)):
            raise ValueError(
                f"task type {name!r}: retention for {key} must be a positive timedelta or None"
            )
        periods[status] = None if period is None else period.total_seconds()
    return periods


def get_task_type(name: str) -> TaskType:
    try:
        return _registry[name]
    except KeyError:
        raise UnknownTaskType(
            f"unknown task type {name!r}",
            fields=[
                {"loc": ["body", "type"], "msg": f"unknown task type {name!r}", "type": "unknown"}
            ],
        ) from None


def all_task_types() -> list[TaskType]:
    return sorted(_registry.values(), key=lambda task: task.name)


def registry_version() -> int:
    """A number that changes whenever a task type is registered."""
    return _version


@dataclass(frozen=True)
class TimeLimits:
    """A run's limits in seconds: at `soft` Celery raises SoftTimeLimitExceeded in the task,
    at `hard` it kills the pool process; the reaper treats a run past `hard` as killed."""

    soft: float
    hard: float


def time_limits(name: str, *, settings: Settings) -> TimeLimits:
    """The one place the limits are worked out: the type's own limit, or the default
    (TASKDOCK_TASK_DEFAULT_TIME_LIMIT), and the hard one TASKDOCK_TASK_HARD_LIMIT_GRACE seconds
    later. An unknown type (a module not loaded) gets the default."""
    task = _registry.get(name)
    soft = (task.time_limit if task is not None else None) or settings.task_default_time_limit
    return TimeLimits(soft=soft, hard=soft + settings.task_hard_limit_grace)


def known_queues(extra: list[str]) -> set[str]:
    """Every queue a worker consumes by default and a submission may name."""
    return {task.queue for task in _registry.values()} | {"default"} | set(extra)


def load_task_modules(modules: list[str]) -> None:
    """Import the built-in task types and every user module named in settings.

    Modules in the current directory import as they do for `celery -A` and `uvicorn`: the
    `taskdock` script's own folder, not the one it runs in, is first on sys.path.
    """
    importlib.import_module("app.tasks.builtin")
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"invalid configuration: TASKDOCK_TASK_MODULES: cannot import {module!r} ({exc})"
            ) from None
