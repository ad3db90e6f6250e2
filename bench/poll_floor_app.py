"""Poll's floor: the least a FastAPI GET by id on PostgreSQL can cost on this machine.

The minimal prototype issue 13 asks for before a target is called out of reach: one FastAPI
route, no dependencies, no middleware, no auth, no rate limit, no metrics; a handful of
psycopg async connections, a prepared SELECT of the same columns the API returns, the JSON
built once from the row. Served with the API's uvicorn settings beside the hello-world app, its
rate ÷ hello's is what FastAPI + psycopg allow; taskdock's poll ÷ it is what taskdock adds.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import psycopg
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response

COLUMNS = (
    "id, type, status, payload, queue, priority, attempt, max_attempts, deliveries, worker, "
    "result, error, idempotency_key, run_after, created_at, updated_at, queued_at, started_at, "
    "finished_at"
)
QUERY = f"SELECT {COLUMNS} FROM task WHERE id = %s"
CONNECTIONS = 4


def _dsn() -> str:
    url = os.environ["TASKDOCK_DATABASE_URL"]
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(type(value).__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        idle.put_nowait(await psycopg.AsyncConnection.connect(_dsn(), autocommit=True))
    app.state.idle = idle
    yield
    while not idle.empty():
        await idle.get_nowait().close()


app = FastAPI(lifespan=lifespan)


@app.get("/tasks/{task_id}")
async def get_task(task_id: uuid.UUID) -> Response:
    idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = app.state.idle
    connection = await idle.get()
    try:
        cursor = await connection.execute(QUERY, (task_id,), prepare=True)
        names = [column.name for column in cursor.description or ()]
        row = await cursor.fetchone()
    finally:
        idle.put_nowait(connection)
    if row is None:
        raise HTTPException(status_code=404)
    body = json.dumps(dict(zip(names, row, strict=True)), default=_default)
    return Response(body, media_type="application/json")
