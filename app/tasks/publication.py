"""Publication: how a committed task reaches the broker. This docstring is the map.

The record is the truth and a broker message only a doorbell: `(task_id, attempt)` in Celery's
own message format (the one job `taskdock.execute`, named after the task type by Celery's
`shadow`), so any Celery worker, `celery inspect` and Flower read it. Publishing twice is
harmless (a run's claim is fenced by attempt and delivery); publishing never is what the three
paths below prevent.

1. **The API** (`Submitter`). A submission's row is written QUEUED and, when the API will ring
   for it, already marked published (`published_at = queued_at = now`), in one INSERT that
   concurrent submissions share (`GroupCommit`: one multi-row INSERT per round trip, each
   request waiting for its own row's commit). After the commit its message joins the next
   batch (`Publisher`: one broker round trip per batch: on redis:// a pipeline sent from the
   event loop, `LoopPipeline`; elsewhere from a thread, one AMQP channel or a Redis pipeline).
   A message not sent within TASKDOCK_PUBLISH_TIMEOUT is unmarked (`published_at = NULL`),
   which puts its task in the outbox. Only then does the request answer 202.
2. **The dispatcher** (app/tasks/dispatcher.py) publishes the outbox (`publish_outbox`, at the
   end of this module): waiting rows, due, not marked, untouched for
   TASKDOCK_DISPATCH_GRACE_SECONDS, taken FOR UPDATE SKIP LOCKED; it marks them once the broker
   took them. Countdowns, retries, the reaper's requeues and the API's
   retry all reach the broker this way, and so does every submission when
   TASKDOCK_PUBLISH_ON_SUBMIT=false or while the broker was found away.
3. **The lost-message sweep** (`forget_lost_publications` in app/tasks/recovery.py, run by the
   dispatcher) unmarks rows whose message the broker no longer holds: the API died between its
   commit and its publish, or Redis restarted empty. It compares the broker's queue depths with
   the marked rows, so only the shortfall is sent again and a backlog never multiplies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg
import redis.asyncio
from celery import Celery, signals
from kombu import Connection, Producer
from sqlalchemy import func, select, tuple_, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app.core import redisbroker
from app.core.celery import JOB_NAME
from app.core.config import Settings
from app.core.db import session_scope
from app.db.base import utcnow
from app.tasks import service
from app.tasks.models import Task
from app.tasks.registry import TimeLimits, time_limits
from app.tasks.schemas import TaskCreate
from app.tasks.states import WAITING, TaskStatus

if TYPE_CHECKING:
    from app.api.deps import Database

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Doorbell:
    """What the broker carries: never the payload, only where to find it."""

    task_id: uuid.UUID
    attempt: int
    type: str
    queue: str
    priority: int
    limits: TimeLimits
    request_id: str | None = None


def doorbell(task: Task, *, settings: Settings) -> Doorbell:
    """What the broker is told about a committed record; `settings` give the default time
    limits."""
    return _doorbell(
        task.id, task.attempt, task.type, task.queue, task.priority, task.request_id, settings
    )


def row_doorbell(row: dict[str, Any], *, settings: Settings) -> Doorbell:
    """`doorbell` for a row `service.prepare` made."""
    return _doorbell(
        row["id"],
        row["attempt"],
        row["type"],
        row["queue"],
        row["priority"],
        row["request_id"],
        settings,
    )


def _doorbell(
    task_id: uuid.UUID,
    attempt: int,
    type_: str,
    queue: str,
    priority: int,
    request_id: str | None,
    settings: Settings,
) -> Doorbell:
    return Doorbell(
        task_id=task_id,
        attempt=attempt,
        type=type_,
        queue=queue,
        priority=priority,
        limits=time_limits(type_, settings=settings),
        request_id=request_id,
    )


def message_id(task_id: uuid.UUID, attempt: int) -> str:
    """One Celery id per attempt, so revoking an attempt never blocks a later retry."""
    return f"{task_id}.{attempt}"


def send(app: Celery, bell: Doorbell, *, producer: Any, declare: bool = True) -> None:
    """Publish one message in Celery's own format (protocol 2), without Celery's retry loop
    (it can stall for seconds). `declare=False` when the queue is known declared on
    `producer`'s channel: a declaration may be a broker round trip."""
    broker = app.conf.broker_url.split("://", 1)[0]
    # Redis sorts priority 0 first, RabbitMQ 9 first; the API speaks RabbitMQ's language.
    priority = 9 - bell.priority if broker.startswith("redis") else bell.priority
    task_id = str(bell.task_id)
    kwargs = {"task_id": task_id, "attempt": bell.attempt}
    headers = {"taskdock_type": bell.type, "taskdock_request_id": bell.request_id}
    options: dict[str, Any] = {
        # What Flower, `celery inspect` and `celery events` show: the task type's name and the
        # taskdock id. Given here, Celery does not build them with its (slower) saferepr.
        "shadow": bell.type,
        "argsrepr": "()",
        "kwargsrepr": f"{{'task_id': '{task_id}', 'attempt': {bell.attempt}}}",
        # Celery's stubs say int; it takes seconds as a float.
        "soft_time_limit": bell.limits.soft,
        "time_limit": bell.limits.hard,
    }
    queue = app.amqp.queues[bell.queue]
    if _celery_listens(app) or queue.exchange.type != "direct":
        # Celery's own path sends the task-sent event and the publish signals (tracing
        # libraries hook them), and routes any other exchange type.
        app.send_task(
            JOB_NAME,
            kwargs=kwargs,
            queue=bell.queue,
            priority=priority,
            task_id=message_id(bell.task_id, bell.attempt),
            retry=False,
            producer=producer,
            headers=headers,
            **options,
        )
        return
    # The message send_task would build, published as its send_task_message would on a direct
    # exchange, without the router, the option merging and the result object: a batched
    # publish costs 0.05 ms of CPU instead of 0.12-0.2 ms (measured on Redis).
    message = app.amqp.as_task_v2(
        message_id(bell.task_id, bell.attempt),
        JOB_NAME,
        args=(),
        kwargs=kwargs,
        reply_to=app.thread_oid,
        ignore_result=False,
        **options,
    )
    message.headers.update(headers)
    producer.publish(
        message.body,
        exchange="",
        routing_key=queue.name,
        declare=[queue] if declare else None,
        serializer=app.conf.task_serializer,
        compression=app.conf.task_compression,
        delivery_mode=queue.exchange.delivery_mode or app.conf.task_default_delivery_mode,
        headers=message.headers,
        priority=priority,
        retry=False,
        **message.properties,
    )


def _celery_listens(app: Celery) -> bool:
    """Whether anything waits for Celery's own publish path: its sent events or signals."""
    return bool(
        app.conf.task_send_sent_event
        or signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
    )


def send_batch(app: Celery, bells: Sequence[Doorbell]) -> tuple[int, Exception | None]:
    """Publish messages in one broker round trip where the transport can (kombu's
    `Producer.batch`: a Redis pipeline); elsewhere one after another on one channel.

    Returns how many of `bells`, from the first, the broker took, and the error that stopped
    the rest. A failed Redis batch counts as none sent, though some may have landed: a
    duplicate costs nothing.
    """
    sent = 0
    try:
        with app.producer_or_acquire() as producer:
            batched = producer.supports_batch_publish
            with producer.batch(max_size=2 * len(bells) + 1):
                for bell in bells:
                    send(app, bell, producer=producer)
                    if not batched:
                        sent += 1
        return len(bells), None
    except Exception as exc:  # kombu raises several families; every one means "not sent"
        return sent, exc


class Batches(Generic[T, R]):
    """Calls that arrive while a flush is in flight go together in the next one.

    `flush(items)` gives one outcome per item, in order (an exception is raised to that item's
    caller alone), or raises for all of them. With nothing in flight a call is flushed at once,
    alone: no timer, no latency added at low load; under load a batch is whatever came during
    the previous round trip.
    """

    def __init__(
        self, flush: Callable[[list[T]], Awaitable[Sequence[R]]], *, max_items: int
    ) -> None:
        self._flush = flush
        self.max_items = max_items
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A test client may run several event loops in turn: start afresh on each.
            self._loop, self._waiting, self._drainer = loop, [], None
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_items]
            del self._waiting[: self.max_items]
            try:
                outcomes = await self._flush([item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its request was cancelled meanwhile
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)


class LoopPipeline:
    """A batch's messages sent to Redis from the event loop, in one pipeline.

    kombu builds and routes every message on a channel of its own (`redisbroker.Channel.collect`
    keeps the Redis commands instead of sending them) and redis.asyncio sends them. That
    channel is opened, and every queue declared on it, by `warm` in the publisher's thread: it
    pings Redis, and a declaration is a round trip. Until then, and after any failure, the
    thread publishes. Only for redis:// and a message Celery's own publish path does not need
    (no sent events, no publish signals, direct exchanges: see `send`).

    The thread cost 0.21 ms of CPU a submission and held the GIL against the event loop: submit
    rose from 0.51 to 0.64 of raw `send_task` without it (docs/performance.md, 2026-12-04).
    """

    def __init__(self, app: Celery, *, timeout: float) -> None:
        self.app = app
        self.timeout = timeout
        # A kombu Producer on the channel `warm` opened (its `connection` is that channel's);
        # Any because kombu's stubs lack its batch().
        self._producer: Any = None
        self._queues: frozenset[str] = frozenset()
        self._client: tuple[asyncio.AbstractEventLoop, redis.asyncio.Redis] | None = None

    @classmethod
    def for_app(cls, app: Celery, *, timeout: float) -> LoopPipeline | None:
        if not app.conf.broker_url.startswith("redis://"):
            return None
        return cls(app, timeout=timeout)

    def takes(self, bells: Sequence[Doorbell]) -> bool:
        """Whether this batch can go from the loop: warm, and nothing to declare or route."""
        if self._producer is None or _celery_listens(self.app):
            return False
        queues = self.app.amqp.queues
        return all(
            bell.queue in self._queues and queues[bell.queue].exchange.type == "direct"
            for bell in bells
        )

    def warm(self) -> None:
        """Open the channel and declare every queue on it. Blocking: in the thread."""
        if self._producer is not None:
            return
        connection = self.app.connection_for_write()
        try:
            connection.ensure_connection(max_retries=0, timeout=math.ceil(self.timeout))
            channel = connection.default_channel
            if not isinstance(channel, redisbroker.Channel):
                raise TypeError(f"{type(channel).__name__} is not taskdock's Redis channel")
            queues = list(self.app.amqp.queues.values())
            for queue in queues:
                queue(channel).declare()
        except BaseException:
            connection.release()
            raise
        self._queues = frozenset(queue.name for queue in queues)
        self._producer = Producer(channel, auto_declare=False)

    def cool(self) -> Connection | None:
        """Forget the channel after a failure (the next batch warms it in the thread); returns
        the connection to release there."""
        producer, self._producer = self._producer, None
        return None if producer is None else producer.connection

    async def send(self, bells: Sequence[Doorbell]) -> None:
        producer = self._producer
        assert producer is not None, "takes() said so"
        channel = producer.channel
        assert isinstance(channel, redisbroker.Channel), "warm() checked it"
        with channel.collect() as commands, producer.batch():
            for bell in bells:
                send(self.app, bell, producer=producer, declare=False)
        async with self._redis().pipeline(transaction=False) as pipeline:
            for name, args in commands:
                getattr(pipeline, name)(*args)
            await pipeline.execute()

    def _redis(self) -> redis.asyncio.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            # A test client may run several event loops in turn; a client's connections
            # belong to the loop that opened them. The broker's own Redis options
            # (app.core.celery.broker_options), but the publish timeout on the socket.
            options = self.app.conf.broker_transport_options or {}
            client = redis.asyncio.Redis.from_url(
                self.app.conf.broker_url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                socket_keepalive=options.get("socket_keepalive", False),
                health_check_interval=options.get("health_check_interval", 0),
            )
            self._client = (loop, client)
        return self._client[1]

    async def close(self) -> None:
        if self._client is not None and self._client[0] is asyncio.get_running_loop():
            await self._client[1].aclose()
        self._client = None
        connection = self.cool()
        if connection is not None:
            connection.release()


class Publisher:
    """The API's publishing: batched, and never blocking a request longer than `timeout`.

    After a failure it stays quiet for a few seconds, so a dead broker costs the API
    nothing; the dispatcher publishes what was skipped.
    """

    def __init__(
        self, app: Celery, *, timeout: float, quiet_seconds: float = 5.0, max_batch: int = 500
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.quiet_seconds = quiet_seconds
        # One batch in flight at a time (see Batches), so one thread is enough.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish")
        self._quiet_until = 0.0
        self._lock = threading.Lock()
        self._batches: Batches[Doorbell, bool] = Batches(self._send, max_items=max_batch)
        self._loop_pipeline = LoopPipeline.for_app(app, timeout=timeout)

    @property
    def quiet(self) -> bool:
        """True while a recent failure says the broker is away: do not even try."""
        return time.monotonic() < self._quiet_until

    async def publish(self, bell: Doorbell) -> bool:
        """Send one message with the next batch; False if it was not sent within `timeout`."""
        if self.quiet:
            return False
        return await self._batches.submit(bell)

    async def _send(self, bells: list[Doorbell]) -> list[bool]:
        if self.quiet:
            # The batch before this one found the broker away: its requests waited for that
            # batch, and none waits for a second timeout.
            return [False] * len(bells)
        pipeline = self._loop_pipeline
        if pipeline is not None and pipeline.takes(bells):
            try:
                await asyncio.wait_for(pipeline.send(bells), timeout=self.timeout)
            except Exception as exc:  # redis raises several families; each means "not sent"
                connection = pipeline.cool()
                if connection is not None:
                    self._executor.submit(connection.release)
                self._quiet(_reason(exc, self.timeout))
                # A failed pipeline counts as none sent, though some may have landed.
                return [False] * len(bells)
            return [True] * len(bells)
        future = asyncio.wrap_future(self._executor.submit(self._send_in_thread, bells))
        try:
            sent, error = await asyncio.wait_for(future, timeout=self.timeout)
        except TimeoutError as exc:
            self._quiet(_reason(exc, self.timeout))
            return [False] * len(bells)
        if error is not None:
            self._quiet(_reason(error, self.timeout))
        return [index < sent for index in range(len(bells))]

    def _send_in_thread(self, bells: list[Doorbell]) -> tuple[int, Exception | None]:
        sent, error = send_batch(self.app, bells)
        if error is None and self._loop_pipeline is not None:
            try:
                self._loop_pipeline.warm()
            except Exception:
                # The batch went; the next one will try the loop's way again.
                logger.warning("could not open the event loop's broker channel", exc_info=True)
        return sent, error

    def _quiet(self, reason: str) -> None:
        with self._lock:
            self._quiet_until = time.monotonic() + self.quiet_seconds
        logger.warning(
            "broker publish failed; the dispatcher will publish", extra={"reason": reason}
        )

    async def close(self) -> None:
        if self._loop_pipeline is not None:
            await self._loop_pipeline.close()
        self._executor.shutdown(wait=False, cancel_futures=True)


def _reason(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"publish took over {timeout}s"
    return f"{type(error).__name__}: {error}"


class QuotaCounts:
    """Unfinished tasks per API key, as the database counted them a moment ago.

    Counting on every submission would cost a round trip each. Here a count is reused for
    FRESH_SECONDS, plus the submissions this process accepted since, and taken afresh for each
    submission in the quota's last tenth: a refusal always rests on a fresh count. Across API
    processes a key may pass its quota by what the others accept in the same instant.
    """

    FRESH_SECONDS = 1.0

    def __init__(self, database: Database) -> None:
        self.database = database
        self._counts: dict[str, tuple[int, float]] = {}

    async def check(self, *, owner: str, limit: int) -> None:
        """QuotaExceeded (429) when `owner` has `limit` unfinished tasks."""
        count, taken = self._counts.get(owner, (0, 0.0))
        now = time.monotonic()
        if now - taken >= self.FRESH_SECONDS or count + max(1, limit // 10) >= limit:
            row = await self.database.fetch_one(service.UNFINISHED_COUNT, {"owner": owner})
            count = int(row["count"]) if row is not None else 0
            if len(self._counts) > 10_000:
                self._counts.clear()
            self._counts[owner] = (count, now)
        service.check_quota(unfinished=count, limit=limit)

    def accepted(self, owner: str) -> None:
        count, taken = self._counts.get(owner, (0, 0.0))
        self._counts[owner] = (count + 1, taken)


# The database is away or busy: no row of a batch can be written.
UNAVAILABLE = (
    OperationalError,
    InterfaceError,
    PoolTimeout,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)


class Submitter:
    """The API's side of the protocol: commit (grouped), publish (batched), record."""

    def __init__(
        self,
        *,
        settings: Settings,
        database: Database,
        publisher: Publisher,
        max_batch: int = 500,
    ) -> None:
        self.settings = settings
        self.database = database
        self.publisher = publisher
        self.quota = QuotaCounts(database)
        self._insert = service.insert_statement("sqlite" if settings.embedded else "postgresql")
        self._commits: Batches[dict[str, Any], Exception | None] = Batches(
            self._commit, max_items=max_batch
        )

    async def submit(
        self,
        *,
        data: TaskCreate,
        owner: str,
        idempotency_key: str | None,
        request_id: str | None,
        quota: int,
    ) -> tuple[dict[str, Any] | Task, bool]:
        """Record a submission, committed, and ring for it; returns (record, created).

        The record is the new row, or the task an earlier request with the same
        Idempotency-Key made (created False). Its `queued_at` says whether the broker has
        been told.
        """
        publishing = self.settings.publish_on_submit and not self.publisher.quiet
        if idempotency_key is not None:
            # The key's lookup and its unique constraint need statements of their own.
            task, created = await self.database.autocommit(
                service.submit,
                data=data,
                owner=owner,
                idempotency_key=idempotency_key,
                extra_queues=self.settings.extra_queues,
                request_id=request_id,
                max_unfinished=quota,
                publishing=publishing,
            )
            if created:
                bell = doorbell(task, settings=self.settings)
                await self._ring(bell, task, due=task.published_at is not None)
            return task, created
        row = service.prepare(
            data=data,
            owner=owner,
            idempotency_key=None,
            extra_queues=self.settings.extra_queues,
            request_id=request_id,
            publishing=publishing,
        )
        if quota:
            await self.quota.check(owner=owner, limit=quota)
        refused = await self._commits.submit(row)
        if refused is not None:
            raise refused
        # Committed: durable before anything else happens.
        if quota:
            self.quota.accepted(owner)
        if row["published_at"] is not None:
            await self._ring(row_doorbell(row, settings=self.settings), row, due=True)
        return row, True

    async def _commit(self, rows: list[dict[str, Any]]) -> list[Exception | None]:
        try:
            await self.database.execute_many(self._insert, rows)
        except UNAVAILABLE:
            raise  # every request of the batch answers 503
        except Exception:
            if len(rows) == 1:
                raise
            # A row the database refuses must not fail the others: each is tried alone.
            return [await self._commit_one(row) for row in rows]
        return [None] * len(rows)

    async def _commit_one(self, row: dict[str, Any]) -> Exception | None:
        try:
            await self.database.execute_many(self._insert, [row])
        except UNAVAILABLE:
            raise
        except Exception as exc:
            return exc
        return None

    async def _ring(self, bell: Doorbell, record: dict[str, Any] | Task, *, due: bool) -> None:
        """Publish a submission marked published at insert; unmark it if that fails."""
        if not due or await self.publisher.publish(bell):
            return
        if isinstance(record, dict):
            record["published_at"] = record["queued_at"] = None
        else:
            record.published_at = record.queued_at = None
        await self.record(published=False, task_id=bell.task_id, attempt=bell.attempt)

    async def ring(self, task: Task) -> bool:
        """Publish a task already committed and not marked (a retry); mark it if sent."""
        if not self.settings.publish_on_submit:
            return False  # the commit woke the dispatcher
        sent = await self.publisher.publish(doorbell(task, settings=self.settings))
        if sent:
            await self.record(published=True, task_id=task.id, attempt=task.attempt)
        return sent

    async def record(self, *, published: bool, task_id: uuid.UUID, attempt: int) -> None:
        try:
            if published:
                await self.database.autocommit(mark_many_published, published=[(task_id, attempt)])
            else:
                await self.database.autocommit(unmark_published, task_id=task_id, attempt=attempt)
        except Exception:
            # The request has succeeded and the task is recorded. A missing mark costs one
            # duplicate message; a missing unmark leaves the task to the lost-message sweep.
            logger.warning("could not record a task's publication", exc_info=True)


def queue_depths(app: Celery, queues: list[str], *, timeout: int = 1) -> dict[str, int]:
    """Messages ready in each broker queue (not those a worker holds unacknowledged).

    Raises when the broker does not answer within `timeout`; a queue the broker does not know
    (never declared, or on Redis emptied and so deleted) holds 0.
    """
    depths: dict[str, int] = {}
    with app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=0, timeout=timeout)
        channel: Any = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True)[1])
            except connection.channel_errors:
                depths[queue] = 0
                channel = connection.channel()
    return depths


# The outbox: the dispatcher's path (2 in the map above).


@dataclass(frozen=True)
class OutboxRound:
    sent: int
    waiting: int  # taken from the outbox but not sent: the broker is away
    error: Exception | None


def publish_outbox(
    *, celery_app: Celery, settings: Settings, limit: int, grace: float, lock: bool
) -> OutboxRound:
    """Send one batch of the outbox in one broker round trip, and mark what the broker took."""
    with session_scope() as session:
        due = due_unpublished(session=session, limit=limit, grace=grace, lock=lock)
        if not due:
            return OutboxRound(sent=0, waiting=0, error=None)
        bells = [doorbell(task, settings=settings) for task in due]
        sent, error = send_batch(celery_app, bells)
        mark_many_published(
            session=session, published=[(task.id, task.attempt) for task in due[:sent]]
        )
        return OutboxRound(sent=sent, waiting=len(due) - sent, error=error)


def due_unpublished(*, session: Session, limit: int, grace: float, lock: bool) -> list[Task]:
    """The outbox: waiting rows the broker has not been told about, due now.

    Rows changed in the last `grace` seconds are left to the API's own publish, so the
    two rarely send the same message twice (twice is harmless, only wasteful).
    """
    now = utcnow()
    query = (
        select(Task)
        .where(
            Task.status.in_(sorted(WAITING)),
            Task.published_at.is_(None),
            Task.run_after <= now,
            Task.updated_at <= now - timedelta(seconds=grace),
        )
        .order_by(Task.priority.desc(), Task.run_after)
        .limit(limit)
    )
    if lock:
        query = query.with_for_update(skip_locked=True)
    return list(session.scalars(query))


def mark_many_published(*, session: Session, published: list[tuple[uuid.UUID, int]]) -> None:
    """One UPDATE for a whole batch: the dispatcher publishes hundreds per round trip."""
    if not published:
        return
    now = utcnow()
    session.execute(
        update(Task)
        .where(tuple_(Task.id, Task.attempt).in_(published), Task.published_at.is_(None))
        .values(published_at=now, queued_at=func.coalesce(Task.queued_at, now))
        .execution_options(synchronize_session=False)
    )


def unmark_published(*, session: Session, task_id: uuid.UUID, attempt: int) -> None:
    """The publish promised at insert did not happen: hand the task to the dispatcher."""
    session.execute(
        update(Task)
        .where(Task.id == task_id, Task.attempt == attempt, Task.status == TaskStatus.QUEUED)
        .values(published_at=None, queued_at=None)
        .execution_options(synchronize_session=False)
    )
