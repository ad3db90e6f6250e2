"""A typed client of taskdock's HTTP API, sync (`Client`) and async (`AsyncClient`), on httpx.

    with Client("https://tasks.example.com", api_key="tdk_…") as client:
        task = client.submit("process_data", {"user_id": 1, "data": "x"})
        done = client.wait(task.id, timeout=60)

Each call is written once, as a generator that yields what it needs done (an HTTP request, or
a pause before a retry) and returns the parsed answer; `Client` and `AsyncClient` only drive
those generators with blocking or awaited I/O. So both clients retry, page and parse alike.

Retries: a 429 or 503 answer, or a connection that failed before any answer, is retried with
exponential backoff (the server's Retry-After when it gives one), up to `retries` times. A
submission always carries an Idempotency-Key (a new one unless given), so a retried submission
never makes two tasks. A call that could do its work twice and has no such key (creating a
schedule, a bulk action) is repeated only when nothing can have been done: see `_Retry`. Other
errors raise at once as `ApiError` subclasses holding the API's error body (`code`, `message`,
and `fields` for a 422).
"""

from __future__ import annotations

import builtins
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar, Unpack

import anyio
import httpx

from app.schedules.models import Catchup, Overlap
from app.schedules.schemas import DEFAULT_WINDOW, ScheduleList, ScheduleRead
from app.tasks.schemas import (
    BulkResult,
    TaskPage,
    TaskRead,
    TaskRunRead,
    TaskRuns,
    TaskTypeRead,
)
from app.tasks.states import TERMINAL
from app.webhooks.schemas import DeliveryList, DeliveryRead

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "Event",
    "Forbidden",
    "InvalidRequest",
    "NotFound",
    "RateLimited",
    "ScheduleChanges",
    "Task",
    "Unauthorized",
    "Unavailable",
]

Task = TaskRead
T = TypeVar("T")


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    read_timeout: float | None = None  # None: the client's own


# What an operation asks its driver for: send this request, or sleep this many seconds.
Step = _Request | float
Operation = Generator[Step, httpx.Response | None, T]

RETRIED_STATUSES = frozenset({429, 503})
MAX_WAIT = 60  # the server's bound on ?wait=
MAX_SCHEDULES = 1000  # the server's bound on GET /schedules?limit=

# Raised before the request left this process: repeating it cannot do anything twice.
UNSENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class _Retry:
    """What a call repeats: the answers in `statuses`, and transport errors (every one, or with
    `unsent_only` those raised before the request left, when a repeat could act twice)."""

    statuses: frozenset[int] = RETRIED_STATUSES
    unsent_only: bool = False


SAFE = _Retry()  # reads, keyed submissions, and changes that land the same when repeated
UNKEYED = _Retry(unsent_only=True)  # a creation in one transaction, with no idempotency key
REFUSED_ONLY = _Retry(statuses=frozenset({429}), unsent_only=True)  # a bulk action


class ApiError(Exception):
    """An error answer. `body` is the API's JSON error (`code`, `message`, ...).

    `repeated`: the answer came to a repeat of a request whose earlier answer was lost, so the
    earlier one may have done the work (a NotFound for a DELETE, a Conflict for a retry)."""

    status_code: int = 0

    def __init__(self, status_code: int, body: dict[str, Any], *, repeated: bool = False) -> None:
        self.status_code = status_code
        self.body = body
        self.repeated = repeated
        self.code: str = str(body.get("code", "unknown"))
        self.message: str = str(body.get("message", ""))
        super().__init__(f"{status_code} {self.code}: {self.message}")


class Unauthorized(ApiError):
    """401: no valid API key."""


class Forbidden(ApiError):
    """403: the key lacks the scope."""


class NotFound(ApiError):
    """404: no such object, or another key's."""


class Conflict(ApiError):
    """409: the object's state forbids the action, or an Idempotency-Key was reused."""


class InvalidRequest(ApiError):
    """422 (or another 4xx): `fields` says what is wrong and where."""

    @property
    def fields(self) -> list[dict[str, Any]]:
        return list(self.body.get("fields") or [])


class RateLimited(ApiError):
    """429, after the client's own retries."""


class Unavailable(ApiError):
    """503 or 5xx, after the client's own retries."""


_ERRORS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
    503: Unavailable,
}


def _raise_for(response: httpx.Response, *, repeated: bool = False) -> None:
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {"code": "http_error", "message": response.text[:500]}
    if not isinstance(body, dict):
        body = {"code": "http_error", "message": str(body)[:500]}
    kind = _ERRORS.get(response.status_code)
    if kind is None:
        kind = InvalidRequest if response.status_code < 500 else Unavailable
    raise kind(response.status_code, body, repeated=repeated)


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of the task stream: `id` resumes it, `data` is the task summary."""

    id: str | None
    event: str
    data: dict[str, Any]


@dataclass
class _SseParser:
    """The text/event-stream framing (WHATWG HTML, 9.2.6): fields until a blank line."""

    last_id: str | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)

    def feed(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = Event(
                id=self.last_id,
                event=self._event or "message",
                data=json.loads("\n".join(self._data)),
            )
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment: the server's heartbeat
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        return None


class ScheduleChanges(TypedDict, total=False):
    """What `update_schedule` may change: only the keys given are sent. To switch between cron
    and interval, give the new one and None for the other."""

    type: str
    name: str | None
    payload: dict[str, Any]
    queue: str | None
    priority: int
    cron: str | None
    timezone: str
    interval_seconds: int | None
    overlap: str
    catchup: str
    catchup_window_seconds: int
    notify_url: str | None
    paused: bool


@dataclass(frozen=True)
class _Calls:
    """Every API call as an Operation; shared by both clients."""

    retries: int
    backoff: float

    def call(self, request: _Request, *, retry: _Retry = SAFE) -> Operation[httpx.Response]:
        repeated = False
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = yield request
            except httpx.TransportError as exc:
                unsent = isinstance(exc, UNSENT)
                if last or (retry.unsent_only and not unsent):
                    raise
                repeated = repeated or not unsent
                yield self.delay(attempt, None)
                continue
            assert response is not None
            if response.status_code in retry.statuses and not last:
                yield self.delay(attempt, response.headers.get("Retry-After"))
                continue
            _raise_for(response, repeated=repeated)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), 60.0)
            except ValueError:
                pass  # an HTTP date: taskdock sends seconds, so fall back to backoff
        return min(self.backoff * 2.0**attempt, 30.0) * random.uniform(0.5, 1.0)  # noqa: S311 (jitter)

    def submit(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        idempotency_key: str | None,
        queue: str | None,
        priority: int | None,
        countdown: float | None,
        notify_url: str | None,
    ) -> Operation[Task]:
        body: dict[str, Any] = {"type": type, "payload": payload}
        for name, value in (
            ("queue", queue),
            ("priority", priority),
            ("countdown", countdown),
            ("notify_url", notify_url),
        ):
            if value is not None:
                body[name] = value
        # Always keyed, so that a submission retried after a lost answer is the same task.
        headers = {"Idempotency-Key": idempotency_key or f"client-{uuid.uuid4()}"}
        request = _Request("POST", "/api/v1/tasks", json=body, headers=headers)
        response = yield from self.call(request)
        return Task.model_validate_json(response.content)

    def get(self, task_id: uuid.UUID | str, *, wait: float | None = None) -> Operation[Task]:
        if not wait:
            response = yield from self.call(_Request("GET", f"/api/v1/tasks/{task_id}"))
        else:
            seconds = _wait_param(wait)
            request = _Request(
                "GET", f"/api/v1/tasks/{task_id}", {"wait": seconds}, read_timeout=seconds + 10
            )
            response = yield from self.call(request)
        return Task.model_validate_json(response.content)

    def wait(self, task_id: uuid.UUID | str, *, timeout: float) -> Operation[Task]:
        deadline = time.monotonic() + timeout
        while True:
            asked = time.monotonic()
            remaining = deadline - asked
            task = yield from self.get(
                task_id, wait=min(remaining, MAX_WAIT) if remaining > 0 else None
            )
            now = time.monotonic()
            if task.status in TERMINAL or now >= deadline:
                return task
            if now - asked < 0.5:
                # Back early and unfinished: a server that does not hold requests. Poll gently.
                yield min(0.5, max(deadline - now, 0.0))

    def page(
        self,
        *,
        status: str | None,
        type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Operation[TaskPage]:
        params: dict[str, Any] = {"limit": limit}
        for name, value in (("status", status), ("type", type), ("cursor", cursor)):
            if value is not None:
                params[name] = value
        request = _Request("GET", "/api/v1/tasks", params)
        response = yield from self.call(request)
        return TaskPage.model_validate_json(response.content)

    def action(self, task_id: uuid.UUID | str, action: str) -> Operation[Task]:
        request = _Request("POST", f"/api/v1/tasks/{task_id}/{action}")
        response = yield from self.call(request)
        return Task.model_validate_json(response.content)

    def task_types(self) -> Operation[list[TaskTypeRead]]:
        response = yield from self.call(_Request("GET", "/api/v1/task-types"))
        return [TaskTypeRead.model_validate(item) for item in response.json()]

    def runs(self, task_id: uuid.UUID | str) -> Operation[list[TaskRunRead]]:
        response = yield from self.call(_Request("GET", f"/api/v1/tasks/{task_id}/runs"))
        return TaskRuns.model_validate_json(response.content).items

    def deliveries(self, task_id: uuid.UUID | str) -> Operation[list[DeliveryRead]]:
        response = yield from self.call(_Request("GET", f"/api/v1/tasks/{task_id}/deliveries"))
        return DeliveryList.model_validate_json(response.content).items

    def bulk(
        self,
        action: str,
        *,
        limit: int,
        ids: Iterable[uuid.UUID | str] | None,
        status: Iterable[str] | None,
        type: str | None,
        queue: str | None,
        created_after: datetime | None,
        created_before: datetime | None,
        dry_run: bool,
    ) -> Operation[BulkResult]:
        body: dict[str, Any] = {"limit": limit, "dry_run": dry_run}
        if ids is not None:
            body["ids"] = [str(task_id) for task_id in ids]
        if status is not None:
            body["status"] = [status] if isinstance(status, str) else list(status)
        for name, value in (("type", type), ("queue", queue)):
            if value is not None:
                body[name] = value
        for name, moment in (("created_after", created_after), ("created_before", created_before)):
            if moment is not None:
                body[name] = moment.isoformat()
        request = _Request("POST", f"/api/v1/tasks/{action}", json=body)
        # A dry run only reads. A real one commits a batch at a time and has no idempotency
        # key: after a lost answer or a 503 (which may follow committed batches) a repeat would
        # take up to `limit` more tasks, and retry again those that failed again meanwhile.
        # Only what proves nothing was done is repeated: an unsent request, or a 429, refused
        # before the route ran.
        response = yield from self.call(request, retry=SAFE if dry_run else REFUSED_ONLY)
        return BulkResult.model_validate_json(response.content)

    def create_schedule(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        cron: str | None,
        timezone: str,
        interval_seconds: int | None,
        name: str | None,
        queue: str | None,
        priority: int,
        overlap: str,
        catchup: str,
        catchup_window_seconds: int,
        notify_url: str | None,
        paused: bool,
    ) -> Operation[ScheduleRead]:
        body = {
            "type": type,
            "payload": payload,
            "cron": cron,
            "timezone": timezone,
            "interval_seconds": interval_seconds,
            "name": name,
            "queue": queue,
            "priority": priority,
            "overlap": overlap,
            "catchup": catchup,
            "catchup_window_seconds": catchup_window_seconds,
            "notify_url": notify_url,
            "paused": paused,
        }
        request = _Request("POST", "/api/v1/schedules", json=body)
        # No Idempotency-Key on this route: a request whose answer was lost may have made the
        # schedule, and a repeat would make a second one (or, if named, answer 409 for our own).
        # So only what proves nothing was done is repeated: an unsent request, a 429 (refused
        # before the route ran) or a 503 (the database was unavailable to its one transaction).
        response = yield from self.call(request, retry=UNKEYED)
        return ScheduleRead.model_validate_json(response.content)

    def schedules(self, *, limit: int) -> Operation[list[ScheduleRead]]:
        request = _Request("GET", "/api/v1/schedules", {"limit": limit})
        response = yield from self.call(request)
        return ScheduleList.model_validate_json(response.content).items

    def schedule(self, schedule_id: uuid.UUID | str) -> Operation[ScheduleRead]:
        response = yield from self.call(_Request("GET", f"/api/v1/schedules/{schedule_id}"))
        return ScheduleRead.model_validate_json(response.content)

    def update_schedule(
        self, schedule_id: uuid.UUID | str, changes: ScheduleChanges
    ) -> Operation[ScheduleRead]:
        request = _Request("PATCH", f"/api/v1/schedules/{schedule_id}", json=dict(changes))
        response = yield from self.call(request)
        return ScheduleRead.model_validate_json(response.content)

    def schedule_action(self, schedule_id: uuid.UUID | str, action: str) -> Operation[ScheduleRead]:
        request = _Request("POST", f"/api/v1/schedules/{schedule_id}/{action}")
        response = yield from self.call(request)
        return ScheduleRead.model_validate_json(response.content)

    def delete_schedule(self, schedule_id: uuid.UUID | str) -> Operation[None]:
        try:
            yield from self.call(_Request("DELETE", f"/api/v1/schedules/{schedule_id}"))
        except NotFound as missing:
            # The earlier try, whose answer was lost, deleted it: what was asked is done.
            if not missing.repeated:
                raise

    def request(
        self, method: str, path: str, *, json_body: Any = None, params: dict[str, Any] | None = None
    ) -> Operation[Any]:
        request = _Request(method, path, params, json_body)
        response = yield from self.call(request)
        return response.json() if response.content else None


def _wait_param(wait: float) -> int:
    return max(1, min(MAX_WAIT, int(wait + 0.999)))


def _timeouts(read: float) -> httpx.Timeout:
    return httpx.Timeout(10.0, connect=5.0, read=read)


def _build(http: httpx.Client | httpx.AsyncClient, request: _Request) -> httpx.Request:
    return http.build_request(
        request.method,
        request.path,
        params=request.params,
        json=request.json,
        headers=request.headers,
        timeout=http.timeout if request.read_timeout is None else _timeouts(request.read_timeout),
    )


def _events_params(
    task_id: uuid.UUID | str | None, type: str | None, status: str | None
) -> dict[str, str]:
    params = {"task_id": task_id, "type": type, "status": status}
    return {name: str(value) for name, value in params.items() if value is not None}


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "taskdock-client"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Client:
    """The blocking client. Use it as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )
        self._calls = _Calls(retries=retries, backoff=backoff)

    def _run(self, operation: Operation[T]) -> T:
        try:
            step = next(operation)
            while True:
                if isinstance(step, _Request):
                    try:
                        response = self._http.send(_build(self._http, step))
                    except httpx.TransportError as exc:
                        step = operation.throw(exc)
                        continue
                    step = operation.send(response)
                else:
                    time.sleep(step)
                    step = operation.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def submit(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        notify_url: str | None = None,
    ) -> Task:
        return self._run(
            self._calls.submit(
                type,
                payload or {},
                idempotency_key=idempotency_key,
                queue=queue,
                priority=priority,
                countdown=countdown,
                notify_url=notify_url,
            )
        )

    def get(self, task_id: uuid.UUID | str) -> Task:
        return self._run(self._calls.get(task_id))

    def wait(self, task_id: uuid.UUID | str, *, timeout: float = 60.0) -> Task:
        """The task once final, or as it is when `timeout` seconds have passed."""
        return self._run(self._calls.wait(task_id, timeout=timeout))

    def list(
        self, *, status: str | None = None, type: str | None = None, page_size: int = 100
    ) -> Iterator[Task]:
        """Every matching task, newest first, fetched a page at a time."""
        cursor: str | None = None
        while True:
            page = self._run(
                self._calls.page(status=status, type=type, limit=page_size, cursor=cursor)
            )
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, task_id: uuid.UUID | str) -> Task:
        return self._run(self._calls.action(task_id, "cancel"))

    def retry(self, task_id: uuid.UUID | str) -> Task:
        return self._run(self._calls.action(task_id, "retry"))

    def task_types(self) -> builtins.list[TaskTypeRead]:
        return self._run(self._calls.task_types())

    def runs(self, task_id: uuid.UUID | str) -> builtins.list[TaskRunRead]:
        """Every run of every attempt, oldest first: its worker, outcome, error and duration."""
        return self._run(self._calls.runs(task_id))

    def deliveries(self, task_id: uuid.UUID | str) -> builtins.list[DeliveryRead]:
        """The webhook deliveries of a task submitted with a notify_url."""
        return self._run(self._calls.deliveries(task_id))

    def bulk_cancel(
        self,
        *,
        limit: int,
        ids: Iterable[uuid.UUID | str] | None = None,
        status: Iterable[str] | None = None,
        type: str | None = None,
        queue: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        dry_run: bool = False,
    ) -> BulkResult:
        """Cancel at most `limit` of the tasks every given criterion matches, oldest first."""
        return self._run(
            self._calls.bulk(
                "cancel",
                limit=limit,
                ids=ids,
                status=status,
                type=type,
                queue=queue,
                created_after=created_after,
                created_before=created_before,
                dry_run=dry_run,
            )
        )

    def bulk_retry(
        self,
        *,
        limit: int,
        ids: Iterable[uuid.UUID | str] | None = None,
        status: Iterable[str] | None = None,
        type: str | None = None,
        queue: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        dry_run: bool = False,
    ) -> BulkResult:
        """Retry at most `limit` of the FAILED or CANCELLED tasks the criteria match."""
        return self._run(
            self._calls.bulk(
                "retry",
                limit=limit,
                ids=ids,
                status=status,
                type=type,
                queue=queue,
                created_after=created_after,
                created_before=created_before,
                dry_run=dry_run,
            )
        )

    def create_schedule(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        cron: str | None = None,
        timezone: str = "UTC",
        interval_seconds: int | None = None,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        overlap: str = Overlap.ALLOW,
        catchup: str = Catchup.LATEST,
        catchup_window_seconds: int = DEFAULT_WINDOW,
        notify_url: str | None = None,
        paused: bool = False,
    ) -> ScheduleRead:
        """A schedule firing a task of `type` on `cron` (in `timezone`) or every N seconds."""
        return self._run(
            self._calls.create_schedule(
                type,
                payload or {},
                cron=cron,
                timezone=timezone,
                interval_seconds=interval_seconds,
                name=name,
                queue=queue,
                priority=priority,
                overlap=overlap,
                catchup=catchup,
                catchup_window_seconds=catchup_window_seconds,
                notify_url=notify_url,
                paused=paused,
            )
        )

    def schedules(self, *, limit: int = MAX_SCHEDULES) -> builtins.list[ScheduleRead]:
        """This key's schedules, oldest first (at most `limit`, the API's bound being 1000)."""
        return self._run(self._calls.schedules(limit=limit))

    def schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        return self._run(self._calls.schedule(schedule_id))

    def update_schedule(
        self, schedule_id: uuid.UUID | str, **changes: Unpack[ScheduleChanges]
    ) -> ScheduleRead:
        """Change only the fields given; a retimed schedule starts from its next slot."""
        return self._run(self._calls.update_schedule(schedule_id, changes))

    def pause_schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        return self._run(self._calls.schedule_action(schedule_id, "pause"))

    def resume_schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        """Resume from the next slot after now: slots missed while paused are not owed."""
        return self._run(self._calls.schedule_action(schedule_id, "resume"))

    def delete_schedule(self, schedule_id: uuid.UUID | str) -> None:
        """Delete a schedule; the tasks it fired stay."""
        self._run(self._calls.delete_schedule(schedule_id))

    def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        """Any other route, with the same retries and errors."""
        return self._run(self._calls.request(method, path, json_body=json, params=params))

    def events(
        self,
        *,
        task_id: uuid.UUID | str | None = None,
        type: str | None = None,
        status: str | None = None,
        last_event_id: str | None = None,
    ) -> Iterator[Event]:
        """The task event stream; it reconnects by itself, resuming after the last event seen."""
        parser = _SseParser(last_id=last_event_id)
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if parser.last_id is not None:
                headers["Last-Event-ID"] = parser.last_id
            try:
                with self._http.stream(
                    "GET",
                    "/api/v1/events",
                    params=_events_params(task_id, type, status),
                    headers=headers,
                    timeout=_timeouts(120.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        _raise_for(response)
                    failures = 0
                    for line in response.iter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
            except httpx.TransportError:
                failures += 1
                if failures > self._calls.retries:
                    raise
                time.sleep(self._calls.delay(failures - 1, None))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """The asyncio client: the same calls as `Client`, awaited."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            headers=_headers(api_key),
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )
        self._calls = _Calls(retries=retries, backoff=backoff)

    async def _run(self, operation: Operation[T]) -> T:
        try:
            step = next(operation)
            while True:
                if isinstance(step, _Request):
                    try:
                        response = await self._http.send(_build(self._http, step))
                    except httpx.TransportError as exc:
                        step = operation.throw(exc)
                        continue
                    step = operation.send(response)
                else:
                    await anyio.sleep(step)
                    step = operation.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def submit(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        queue: str | None = None,
        priority: int | None = None,
        countdown: float | None = None,
        notify_url: str | None = None,
    ) -> Task:
        return await self._run(
            self._calls.submit(
                type,
                payload or {},
                idempotency_key=idempotency_key,
                queue=queue,
                priority=priority,
                countdown=countdown,
                notify_url=notify_url,
            )
        )

    async def get(self, task_id: uuid.UUID | str) -> Task:
        return await self._run(self._calls.get(task_id))

    async def wait(
        self,
        task_id: uuid.UUID | str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 (the server holds each request; this caps them)
    ) -> Task:
        """The task once final, or as it is when `timeout` seconds have passed."""
        return await self._run(self._calls.wait(task_id, timeout=timeout))

    async def list(
        self, *, status: str | None = None, type: str | None = None, page_size: int = 100
    ) -> AsyncIterator[Task]:
        """Every matching task, newest first, fetched a page at a time."""
        cursor: str | None = None
        while True:
            page = await self._run(
                self._calls.page(status=status, type=type, limit=page_size, cursor=cursor)
            )
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, task_id: uuid.UUID | str) -> Task:
        return await self._run(self._calls.action(task_id, "cancel"))

    async def retry(self, task_id: uuid.UUID | str) -> Task:
        return await self._run(self._calls.action(task_id, "retry"))

    async def task_types(self) -> builtins.list[TaskTypeRead]:
        return await self._run(self._calls.task_types())

    async def runs(self, task_id: uuid.UUID | str) -> builtins.list[TaskRunRead]:
        """Every run of every attempt, oldest first: its worker, outcome, error and duration."""
        return await self._run(self._calls.runs(task_id))

    async def deliveries(self, task_id: uuid.UUID | str) -> builtins.list[DeliveryRead]:
        """The webhook deliveries of a task submitted with a notify_url."""
        return await self._run(self._calls.deliveries(task_id))

    async def bulk_cancel(
        self,
        *,
        limit: int,
        ids: Iterable[uuid.UUID | str] | None = None,
        status: Iterable[str] | None = None,
        type: str | None = None,
        queue: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        dry_run: bool = False,
    ) -> BulkResult:
        """Cancel at most `limit` of the tasks every given criterion matches, oldest first."""
        return await self._run(
            self._calls.bulk(
                "cancel",
                limit=limit,
                ids=ids,
                status=status,
                type=type,
                queue=queue,
                created_after=created_after,
                created_before=created_before,
                dry_run=dry_run,
            )
        )

    async def bulk_retry(
        self,
        *,
        limit: int,
        ids: Iterable[uuid.UUID | str] | None = None,
        status: Iterable[str] | None = None,
        type: str | None = None,
        queue: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        dry_run: bool = False,
    ) -> BulkResult:
        """Retry at most `limit` of the FAILED or CANCELLED tasks the criteria match."""
        return await self._run(
            self._calls.bulk(
                "retry",
                limit=limit,
                ids=ids,
                status=status,
                type=type,
                queue=queue,
                created_after=created_after,
                created_before=created_before,
                dry_run=dry_run,
            )
        )

    async def create_schedule(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        cron: str | None = None,
        timezone: str = "UTC",
        interval_seconds: int | None = None,
        name: str | None = None,
        queue: str | None = None,
        priority: int = 0,
        overlap: str = Overlap.ALLOW,
        catchup: str = Catchup.LATEST,
        catchup_window_seconds: int = DEFAULT_WINDOW,
        notify_url: str | None = None,
        paused: bool = False,
    ) -> ScheduleRead:
        """A schedule firing a task of `type` on `cron` (in `timezone`) or every N seconds."""
        return await self._run(
            self._calls.create_schedule(
                type,
                payload or {},
                cron=cron,
                timezone=timezone,
                interval_seconds=interval_seconds,
                name=name,
                queue=queue,
                priority=priority,
                overlap=overlap,
                catchup=catchup,
                catchup_window_seconds=catchup_window_seconds,
                notify_url=notify_url,
                paused=paused,
            )
        )

    async def schedules(self, *, limit: int = MAX_SCHEDULES) -> builtins.list[ScheduleRead]:
        """This key's schedules, oldest first (at most `limit`, the API's bound being 1000)."""
        return await self._run(self._calls.schedules(limit=limit))

    async def schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        return await self._run(self._calls.schedule(schedule_id))

    async def update_schedule(
        self, schedule_id: uuid.UUID | str, **changes: Unpack[ScheduleChanges]
    ) -> ScheduleRead:
        """Change only the fields given; a retimed schedule starts from its next slot."""
        return await self._run(self._calls.update_schedule(schedule_id, changes))

    async def pause_schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        return await self._run(self._calls.schedule_action(schedule_id, "pause"))

    async def resume_schedule(self, schedule_id: uuid.UUID | str) -> ScheduleRead:
        """Resume from the next slot after now: slots missed while paused are not owed."""
        return await self._run(self._calls.schedule_action(schedule_id, "resume"))

    async def delete_schedule(self, schedule_id: uuid.UUID | str) -> None:
        """Delete a schedule; the tasks it fired stay."""
        await self._run(self._calls.delete_schedule(schedule_id))

    async def request(
        self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None
    ) -> Any:
        """Any other route, with the same retries and errors."""
        return await self._run(self._calls.request(method, path, json_body=json, params=params))

    async def events(
        self,
        *,
        task_id: uuid.UUID | str | None = None,
        type: str | None = None,
        status: str | None = None,
        last_event_id: str | None = None,
    ) -> AsyncIterator[Event]:
        """The task event stream; it reconnects by itself, resuming after the last event seen."""
        parser = _SseParser(last_id=last_event_id)
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if parser.last_id is not None:
                headers["Last-Event-ID"] = parser.last_id
            try:
                async with self._http.stream(
                    "GET",
                    "/api/v1/events",
                    params=_events_params(task_id, type, status),
                    headers=headers,
                    timeout=_timeouts(120.0),
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for(response)
                    failures = 0
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            yield event
            except httpx.TransportError:
                failures += 1
                if failures > self._calls.retries:
                    raise
                await anyio.sleep(self._calls.delay(failures - 1, None))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
