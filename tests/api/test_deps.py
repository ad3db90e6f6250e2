"""The API's database units on PostgreSQL: how many connections concurrent requests cost."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from app.api.deps import Database
from app.core.config import Settings


def backend_pid(*, session: Session) -> int:
    # Long enough that every request of a burst is in flight at once.
    session.execute(text("SELECT pg_sleep(0.05)"))
    return int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_bursts_past_the_pool_reuse_its_connections_instead_of_opening_new_ones(
    pg_env: dict[str, str],
) -> None:
    database = Database(settings=Settings(database_pool_size=1, database_max_overflow=1))
    connects: list[Any] = []

    async def bursts() -> tuple[list[int], list[int]]:
        first = await asyncio.gather(*(database.autocommit(backend_pid) for _ in range(8)))
        assert database.engine is not None
        event.listen(database.engine.sync_engine, "connect", lambda *args: connects.append(args))
        try:
            second = await asyncio.gather(*(database.autocommit(backend_pid) for _ in range(8)))
        finally:
            await database.close()
        return first, second

    first, second = asyncio.run(bursts())

    # Every request answered, on at most pool size + overflow connections, and the second
    # burst found them all still open: an overflow connection closed at its return would have
    # been opened again.
    assert len(first) == len(second) == 8
    assert len(set(first) | set(second)) <= 2
    assert connects == []
