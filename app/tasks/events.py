"""Task events: waiting for a task to finish, and the stream of status changes.

The map:

- **The record numbers its changes.** Migration 0010's trigger gives every status change (and
  every new task) the next `change_seq` from one sequence. On PostgreSQL it also sends a small
  notification on the `taskdock_events` channel at commit (id, status, owner, type, queue,
  attempt, updated_at and the seq), but only while some API process listens: a NOTIFY costs
  every writing commit a database-wide lock (migration 0013 has the figures). No statement of
  the API, the worker or the dispatcher knows.
- **One hub per API process** (`EventHub`, on `app.state.events`). On PostgreSQL it holds one
  connection of its own, outside the pool, named `taskdock-api-events`, which LISTENs,
  registers in `task_event_listener` (`_register`: the trigger sends only while a row is
  there), and fans each notification out in memory: to the requests waiting on that task id
  (`watch`), and to the stream subscriptions whose filter it matches (`subscribe`). It starts
  at the first wait or stream, reconnects with backoff when PostgreSQL goes away, stops (row
  deleted, connection closed) once nobody has waited or streamed for
  TASKDOCK_EVENTS_IDLE_SECONDS, and is cancelled at shutdown; health checks never touch it.
  Each (re)registration ends by telling every waiter and stream to read the table
  (`_missed`): what changed while nobody listened is only there. On SQLite, where there is no
  LISTEN, the hub looks for `change_seq > last` every TASKDOCK_EVENTS_POLL_INTERVAL seconds
  instead, and only while someone waits or streams.
- **Wait** (`wait_for_final`, `GET /api/v1/tasks/{id}?wait=N`): register first, then read the
  row; until it is final, sleep until the hub says it finished (or, while the hub is not
  listening, a poll interval), then read again. A waiter holds no database connection while
  it sleeps.
- **Stream** (`stream`, `GET /api/v1/events`): subscribe first, then replay from the table what
  changed after `Last-Event-ID` (`changes_since`), then go on with the live changes, skipping
  any the replay already sent. When the hub reconnects, or a slow client lets its backlog pass
  `BACKLOG`, the subscription is marked for a resync: the stream replays from the table again
  from the last seq it sent, so nothing in between is lost.

A replay sends each changed task once, in its current state; the live stream sends every
change. Events carry a task's summary (`Change.summary`), never its payload or result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, cast

import psycopg
from fastapi.sse import ServerSentEvent
from sqlalchemy import Table, select, text
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import listen_connection
from app.tasks.models import FORGET_DEAD_LISTENERS, Task
from app.tasks.states import TERMINAL, TaskStatus

logger = logging.getLogger(__name__)

CHANNEL = "taskdock_events"
# Changes a subscription may hold for a slow client before it falls back to a replay.
BACKLOG = 1000
REPLAY_PAGE = 500
RECONNECT_MIN, RECONNECT_MAX = 0.5, 10.0

_TABLE = cast(Table, Task.__table__)
_c = _TABLE.c
_COLUMNS = (_c.change_seq, _c.id, _c.status, _c.owner, _c.type, _c.queue, _c.attempt, _c.updated_at)


@dataclass(frozen=True, slots=True)
class Change:
    """One status change of one task, as the trigger reported it."""

    seq: int
    id: uuid.UUID
    status: TaskStatus
    owner: str
    type: str
    queue: str
    attempt: int
    updated_at: str

    @classmethod
    def from_notification(cls, payload: str) -> Change:
        data = json.loads(payload)
        return cls(
            seq=int(data["seq"]),
            id=uuid.UUID(data["id"]),
            status=TaskStatus(data["status"]),
            owner=data["owner"],
            type=data["type"],
            queue=data["queue"],
            attempt=int(data["attempt"]),
            updated_at=data["updated_at"],
        )

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Change:
        updated = row["updated_at"].astimezone(UTC)
        return cls(
            seq=int(row["change_seq"]),
            id=row["id"],
            status=TaskStatus(row["status"]),
            owner=row["owner"],
            type=row["type"],
            queue=row["queue"],
            attempt=int(row["attempt"]),
            updated_at=updated.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )

    def summary(self) -> str:
        """The event's data: the task's summary as JSON (no payload, result or owner)."""
        return json.dumps(
            {
                "id": str(self.id),
                "type": self.type,
                "status": self.status.value,
                "queue": self.queue,
                "attempt": self.attempt,
                "updated_at": self.updated_at,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which changes a stream wants. `owner` None is an admin key: every owner's tasks."""

    owner: str | None
    task_ids: frozenset[uuid.UUID] = frozenset()
    types: frozenset[str] = frozenset()
    statuses: frozenset[TaskStatus] = frozenset()

    def matches(self, change: Change) -> bool:
        return (
            (self.owner is None or change.owner == self.owner)
            and (not self.task_ids or change.id in self.task_ids)
            and (not self.types or change.type in self.types)
            and (not self.statuses or change.status in self.statuses)
        )


def changes_since(
    *, session: Session, seq: int, where: EventFilter | None, limit: int
) -> list[Change]:
    """The tasks changed after `seq`, each once in its current state, oldest change first."""
    query = select(*_COLUMNS).where(_c.change_seq > seq)
    if where is not None:
        if where.owner is not None:
            query = query.where(_c.owner == where.owner)
        if where.task_ids:
            query = query.where(_c.id.in_(sorted(where.task_ids)))
        if where.types:
            query = query.where(_c.type.in_(sorted(where.types)))
        if where.statuses:
            query = query.where(_c.status.in_(sorted(where.statuses)))
    rows = session.execute(query.order_by(_c.change_seq).limit(limit)).mappings()
    return [Change.from_row(row) for row in rows]


def head(*, session: Session) -> int:
    """The newest change number handed out so far (0 before the first)."""
    if session.get_bind().dialect.name == "postgresql":
        sql = "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM task_change_seq"
    else:
        sql = "SELECT COALESCE(MAX(change_seq), 0) FROM task"
    return int(session.execute(text(sql)).scalar_one())


# Migration 0013: the trigger notifies only while a hub's row is in task_event_listener. A hub
# that died without a word (its backend gone) is dropped by the next one to register, and by
# the dispatcher's sweep (app.tasks.recovery).
_REGISTER = (
    FORGET_DEAD_LISTENERS,
    "INSERT INTO task_event_listener (pid, since) VALUES (pg_backend_pid(), now()) "
    "ON CONFLICT (pid) DO NOTHING",
)
_UNREGISTER = "DELETE FROM task_event_listener WHERE pid = pg_backend_pid()"
# How long a registering hub waits for the transactions that may have skipped their notification.
SETTLE_SECONDS = 2.0


async def _register(connection: psycopg.AsyncConnection[Any]) -> None:
    """Ask the trigger for notifications, then wait until every transaction that may have
    decided "nobody listens" before the row was there has ended: the caller then tells its
    waiters and streams to read the table (`_missed`), and each such change is in it.

    The trigger takes its transaction's id before it looks (migration 0013), so those are the
    transactions running at the registration: all of them have ended once the oldest running
    transaction is newer than the newest id of that moment. A transaction that runs longer than
    SETTLE_SECONDS (none of taskdock's writes; perhaps someone's open psql session on the same
    server) is not waited for: a waiter it concerns still reads again at its deadline."""
    for statement in _REGISTER:
        await connection.execute(statement)
    cursor = await connection.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text")
    horizon = (await cursor.fetchone() or ("0",))[0]
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        cursor = await connection.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= %s::xid8", (horizon,)
        )
        if (await cursor.fetchone() or (False,))[0]:
            return
        await asyncio.sleep(0.01)
    logger.warning("a transaction older than the event listener's registration is still open")


# How a hub runs database work: `Database.autocommit` of app.api.deps.
Run = Callable[..., Awaitable[Any]]
Read = Callable[[], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class Watch:
    woken: asyncio.Event
    ticket: int  # the order of its registration (EventHub.read)


class Subscription:
    """One stream's queue of matching changes, or its note that it must replay instead."""

    def __init__(self, where: EventFilter) -> None:
        self.where = where
        self.resync = False
        self._pending: deque[Change] = deque()
        self._woken = asyncio.Event()

    def deliver(self, change: Change) -> None:
        if self.resync or not self.where.matches(change):
            return
        if len(self._pending) >= BACKLOG:
            self.request_resync()
            return
        self._pending.append(change)
        self._woken.set()

    def request_resync(self) -> None:
        self.resync = True
        self._pending.clear()
        self._woken.set()

    async def next(self, seconds: float) -> list[Change]:
        """The changes waiting, after at most `seconds` (none: a heartbeat is due)."""
        if not self._pending and not self.resync:
            self._woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), seconds)
        taken = list(self._pending)
        self._pending.clear()
        return taken


class EventHub:
    """The API process's one listener, shared by every waiter and stream (see the module map)."""

    def __init__(self, *, settings: Settings, run: Run) -> None:
        self.settings = settings
        self.run = run
        self.embedded = settings.embedded
        self.listening = False
        self._waiters: dict[uuid.UUID, set[asyncio.Event]] = {}
        self._tickets = 0
        self._reads: dict[Hashable, tuple[int, asyncio.Future[Mapping[str, Any] | None]]] = {}
        self._subscriptions: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def poll_interval(self) -> float:
        return self.settings.events_poll_interval

    @contextlib.contextmanager
    def watch(self, task_id: uuid.UUID) -> Iterator[Watch]:
        """A `Watch` woken when `task_id` may have become final (or the hub may have missed
        it)."""
        self._start()
        self._tickets += 1
        watch = Watch(woken=asyncio.Event(), ticket=self._tickets)
        self._waiters.setdefault(task_id, set()).add(watch.woken)
        try:
            yield watch
        finally:
            waiting = self._waiters.get(task_id)
            if waiting is not None:
                waiting.discard(watch.woken)
                if not waiting:
                    del self._waiters[task_id]

    async def read(self, watch: Watch, key: Hashable, read: Read) -> Mapping[str, Any] | None:
        """`read()`, shared with the other waiters of `key` whose read began after `watch`
        was registered: when a task finishes, its thousand waiters make one round trip, not a
        thousand at once, which would exhaust the pool. A read begun earlier may predate the
        change this waiter was told of, so it is not joined."""
        running = self._reads.get(key)
        if running is not None and running[0] >= watch.ticket:
            return await asyncio.shield(running[1])
        future = asyncio.ensure_future(read())
        self._reads[key] = (self._tickets, future)
        try:
            return await asyncio.shield(future)
        finally:
            if self._reads.get(key, (0, None))[1] is future:
                del self._reads[key]

    @contextlib.contextmanager
    def subscribe(self, where: EventFilter) -> Iterator[Subscription]:
        self._start()
        subscription = Subscription(where)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    async def sleep(self, woken: asyncio.Event, seconds: float) -> None:
        """Until `woken` or `seconds`; while the hub is not listening, at most a poll interval,
        so a waiter never depends on a notification that cannot come."""
        if not self.listening:
            seconds = min(seconds, self.poll_interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), seconds)

    def dispatch(self, change: Change) -> None:
        if change.status in TERMINAL:
            for woken in self._waiters.get(change.id, ()):
                woken.set()
        for subscription in self._subscriptions:
            subscription.deliver(change)

    def _missed(self) -> None:
        # (Re)connected: whatever changed while nobody listened is only in the table.
        for waiting in self._waiters.values():
            for woken in waiting:
                woken.set()
        for subscription in self._subscriptions:
            subscription.request_resync()

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if self._loop is not loop:
            # A test client may run several event loops in turn; each gets its own hub state.
            self._waiters.clear()
            self._subscriptions.clear()
            self._reads.clear()
        self._loop = loop
        self.listening = False
        body = self._poll() if self.embedded else self._listen()
        self._task = loop.create_task(body, name="taskdock-events")

    async def _listen(self) -> None:
        conninfo, options = listen_connection(self.settings, role="api-events")
        backoff = RECONNECT_MIN
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, **options
                )
                async with connection:
                    await connection.execute(f"LISTEN {CHANNEL}")
                    backoff = RECONNECT_MIN
                    await self._serve(connection)
                # Closed. No await between this test and the return: a watch or subscription
                # that comes after it finds this task done and starts a new one; one that came
                # while the connection closed is served by a new connection.
                if not self._waiters and not self._subscriptions:
                    logger.info("stopped listening for task events: nobody waits")
                    return
                continue
            except (psycopg.Error, OSError) as exc:
                logger.warning(
                    "task events unavailable; reconnecting",
                    extra={"reason": str(exc)[:200], "retry_in": backoff},
                )
            finally:
                self.listening = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX)

    async def _serve(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """Registered, deliver until nobody has waited for the idle time; then unregistered."""
        try:
            while True:
                await _register(connection)
                self.listening = True
                logger.info("listening for task events")
                self._missed()
                await self._until_idle(connection)
                self.listening = False
                await connection.execute(_UNREGISTER)
                if not self._waiters and not self._subscriptions:
                    return
        except asyncio.CancelledError:
            # Shutdown: leave no row behind that would keep the trigger notifying for nobody
            # (the dispatcher's sweep drops it otherwise). Bounded: close() waits 2 s.
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await asyncio.wait_for(connection.execute(_UNREGISTER), 1.0)
            raise

    async def _until_idle(self, connection: psycopg.AsyncConnection[Any]) -> None:
        """Deliver notifications until nobody has waited or streamed for the idle time."""
        idle = self.settings.events_idle_seconds
        idle_since: float | None = None
        while True:
            async for notification in connection.notifies(timeout=min(idle, 1.0)):
                self._deliver(notification.payload)
            if self._waiters or self._subscriptions:
                idle_since = None
                continue
            now = time.monotonic()
            idle_since = idle_since or now
            if now - idle_since >= idle:
                return

    def _deliver(self, payload: str) -> None:
        try:
            change = Change.from_notification(payload)
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable task event", extra={"payload": payload[:200]})
            return
        self.dispatch(change)

    async def _poll(self) -> None:
        last: int | None = None
        while True:
            try:
                if not self._waiters and not self._subscriptions:
                    # Nobody to tell: start again from the head when someone comes, rather
                    # than catch up on every change made meanwhile.
                    self.listening, last = False, None
                elif last is None:
                    last = await self.run(head)
                    self.listening = True
                    self._missed()
                else:
                    changes = await self.run(changes_since, seq=last, where=None, limit=REPLAY_PAGE)
                    for change in changes:
                        self.dispatch(change)
                        last = change.seq
            except Exception as exc:
                logger.warning("task events unavailable", extra={"reason": str(exc)[:200]})
                self.listening, last = False, None
            await asyncio.sleep(self.poll_interval)

    async def close(self) -> None:
        task, self._task = self._task, None
        self.listening = False
        if task is None or task.done() or self._loop is not asyncio.get_running_loop():
            return
        task.cancel()
        # Bounded: shutdown must not hang on a connection that does not answer.
        await asyncio.wait({task}, timeout=2)


async def wait_for_final(
    *, hub: EventHub, task_id: uuid.UUID, key: Hashable, seconds: float, read: Read
) -> Mapping[str, Any] | None:
    """The task's row once it is final, or after `seconds` as it is then; None if not found.
    Waiters with the same `key` (the task and the owner it is read for) share their reads."""
    deadline = time.monotonic() + seconds
    with hub.watch(task_id) as watch:
        row = await hub.read(watch, key, read)
        while row is not None and TaskStatus(row["status"]) not in TERMINAL:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            watch.woken.clear()
            await hub.sleep(watch.woken, remaining)
            row = await hub.read(watch, key, read)
    return row


async def stream(
    *, hub: EventHub, where: EventFilter, after: int, heartbeat: float
) -> AsyncIterator[ServerSentEvent]:
    """The SSE events of `where`'s changes after the change numbered `after`, then live.

    Subscribed first, then replayed from the table: a change made between `after` and the
    subscription comes from the replay, and any later one live."""
    with hub.subscribe(where) as subscription:
        cursor = after
        # The seq at which the replay last sent each task: a live change at or below it is
        # one the client has already been told about.
        replayed: dict[uuid.UUID, int] = {}
        replay = True
        while True:
            if replay or subscription.resync:
                subscription.resync, replay = False, False
                async for change in _replay(hub, where, cursor):
                    replayed[change.id] = change.seq
                    cursor = max(cursor, change.seq)
                    yield _event(change)
            changes = await subscription.next(heartbeat)
            if not changes and not subscription.resync:
                yield ServerSentEvent(comment="heartbeat")
            for change in changes:
                # At or before the start (the client knew that much when it asked), or sent
                # by the replay already.
                if change.seq <= after or change.seq <= replayed.get(change.id, 0):
                    continue
                cursor = max(cursor, change.seq)
                yield _event(change)


async def _replay(hub: EventHub, where: EventFilter, after: int) -> AsyncIterator[Change]:
    while True:
        page: list[Change] = await hub.run(changes_since, seq=after, where=where, limit=REPLAY_PAGE)
        for change in page:
            yield change
        if len(page) < REPLAY_PAGE:
            return
        after = page[-1].seq


def _event(change: Change) -> ServerSentEvent:
    return ServerSentEvent(raw_data=change.summary(), id=str(change.seq))
