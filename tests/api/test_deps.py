"""The API's database units on PostgreSQL: how many connections concurrent requests cost."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from app.api.deps import Database
from app.core.config import Settings


def backend_pid(*, session: Session) -> int:
    # Long enough that every request of the burst is in flight at once.
    session.execute(text("SELECT pg_sleep(0.05)"))
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_burst_past_the_pool_waits_for_pooled_connections_instead_of_opening_more(
    pg_env: dict[str, str],
) -> None:
    settings = Settings(database_pool_size=2, database_max_overflow=10)
    database = Database(settings=settings)
    connects: list[Any] = []

    async def burst() -> list[int]:
        await database.autocommit(backend_pid)  # makes the engine
        assert database.engine is not None
        event.listen(database.engine.sync_engine, "connect", lambda *args: connects.append(args))
        try:
            return await asyncio.gather(*(database.autocommit(backend_pid) for _ in range(8)))
        finally:
            await database.close()

    pids = asyncio.run(burst())

    # All eight answered, on the pool's two connections: none opened (and closed) for overflow.
    assert len(pids) == 8
    assert len(set(pids)) <= 2
    assert len(connects) <= 1  # the second pooled connection, if the first request made one
