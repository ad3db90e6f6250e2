"""Submit's floor: the least a durable FastAPI submit that publishes to Celery can cost here.

The minimal prototype issue 13 asks for before a target is called out of reach, and the one its
own table measured at 1.09 of raw `send_task`: one FastAPI route taking a Pydantic body; group
commit (the requests that arrive while an INSERT is in flight go in the next one, each waiting
for its own row's commit) on a handful of psycopg async connections; then the batch's Celery
messages (protocol 2, built by Celery's `as_task_v2`) in one Redis pipeline (kombu's
`Producer.batch`), and the 202 with the task's id. No auth, no rate limit, no middleware, no
metrics, no request ids, no idempotency, no outbox marks, no timeout on the broker: the
publish runs on the event loop, which the product cannot afford (a slow broker would stall every
request), and a crash between commit and publish loses the message, which the product's outbox
prevents. Served with the API's uvicorn settings, its rate ÷ raw `send_task` is what FastAPI,
psycopg and kombu allow; taskdock's submit ÷ it is what taskdock adds.

Its Celery app has taskdock's settings that shape the hot path (bench.raw_celery's MIRRORED), and
its messages go to a queue of its own, where bench.e2e_floor's worker runs them: the two together
are end-to-end's floor (metrics 2 and 3).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from celery import Celery
from fastapi import FastAPI
from fastapi.responses import Response
from pydantic import BaseModel, Field

from bench.raw_celery import mirrored_settings

INSERT = (
    "INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts,"
    " deliveries, run_after, owner, created_at, updated_at, queued_at, published_at)"
    " VALUES (%s, %s, %s::json, 'QUEUED', %s, 5, 1, 4, 0, now(), '', now(), now(),"
    " now(), now())"
)
CONNECTIONS = 4
MAX_BATCH = 64


class TaskCreate(BaseModel):
    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] = Field(default_factory=dict)


def _dsn() -> str:
    url = os.environ["TASKDOCK_DATABASE_URL"]
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


QUEUE = "submit-floor"
BROKER = os.environ["TASKDOCK_BROKER_URL"]
celery = Celery("submit-floor", broker=BROKER)
celery.conf.update(
    task_default_queue=QUEUE, worker_hijack_root_logger=False, **mirrored_settings(BROKER)
)


class GroupCommit:
    """Rows that arrive while an INSERT is in flight go together in the next one."""

    def __init__(self, idle: asyncio.Queue[psycopg.AsyncConnection[Any]]) -> None:
        self.idle = idle
        self.waiting: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self.drainer: asyncio.Task[None] | None = None

    async def submit(self, row: tuple[Any, ...]) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((row, future))
        if self.drainer is None or self.drainer.done():
            self.drainer = asyncio.create_task(self.drain())
        await future

    async def drain(self) -> None:
        while self.waiting:
            batch, self.waiting = self.waiting[:MAX_BATCH], self.waiting[MAX_BATCH:]
            try:
                await self.flush([row for row, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for _, future in batch:
                    future.set_result(None)

    async def flush(self, rows: list[tuple[Any, ...]]) -> None:
        connection = await self.idle.get()
        try:
            async with connection.transaction(), connection.cursor() as cursor:
                await cursor.executemany(INSERT, rows)
        finally:
            self.idle.put_nowait(connection)
        publish([row[0] for row in rows], [row[1] for row in rows])


def publish(ids: list[str], types: list[str]) -> None:
    queue = celery.amqp.queues[celery.conf.task_default_queue]
    with celery.producer_or_acquire() as producer, producer.batch(max_size=2 * len(ids) + 1):
        for task_id, type_ in zip(ids, types, strict=True):
            message = celery.amqp.as_task_v2(
                task_id,
                "taskdock.execute",
                args=(),
                kwargs={"task_id": task_id, "attempt": 1},
                shadow=type_,
                argsrepr="()",
                kwargsrepr="{}",
            )
            producer.publish(
                message.body,
                exchange="",
                routing_key=queue.name,
                declare=[queue],
                serializer="json",
                headers=message.headers,
                retry=False,
                **message.properties,
            )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(await psycopg.AsyncConnection.connect(_dsn()))
    app.state.commit = GroupCommit(idle)
    yield
    while not idle.empty():
        await idle.get_nowait().close()


app = FastAPI(lifespan=lifespan)


@app.post("/tasks", status_code=202)
async def submit(data: TaskCreate) -> Response:
    task_id = str(uuid.uuid4())
    commit: GroupCommit = app.state.commit
    await commit.submit((task_id, data.type, json.dumps(data.payload), QUEUE))
    body = json.dumps({"id": task_id, "type": data.type, "status": "QUEUED"})
    return Response(body, status_code=202, media_type="application/json")
