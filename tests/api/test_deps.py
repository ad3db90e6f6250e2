"""The API's database units on PostgreSQL: how many connections concurrent requests cost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import event, func, literal, select, text
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


def test_a_hot_statement_hands_its_connection_back_out_of_autocommit(
    pg_env: dict[str, str],
) -> None:
    # One pooled connection: the transaction below gets the very one the SELECT ran on.
    database = Database(settings=Settings(database_pool_size=1, database_max_overflow=0))

    def write_then_fail(*, session: Session) -> None:
        session.execute(text("CREATE TABLE hot_statement_probe (n int)"))
        raise RuntimeError("the request failed after its write")

    async def run() -> bool:
        try:
            row = await database.fetch_one(select(literal(7).label("n")), {})
            assert row == {"n": 7}
            with pytest.raises(RuntimeError):
                await database.transaction(write_then_fail)
            exists = await database.fetch_one(
                select(func.to_regclass("hot_statement_probe").label("t")), {}
            )
            assert exists is not None
            return exists["t"] is None
        finally:
            await database.close()

    # Left in autocommit, the transaction's write would have been committed as it ran.
    assert asyncio.run(run()), "a failed transaction's write was kept"


def test_a_hot_statement_cancelled_midway_leaves_the_pool_usable(pg_env: dict[str, str]) -> None:
    database = Database(settings=Settings(database_pool_size=1, database_max_overflow=0))

    async def run() -> tuple[Any, Any]:
        try:
            slow = asyncio.create_task(database.fetch_one(select(func.pg_sleep(5)), {}))
            await asyncio.sleep(0.3)
            slow.cancel()
            with pytest.raises(asyncio.CancelledError):
                await slow
            after = await asyncio.wait_for(
                database.fetch_one(select(literal(1).label("n")), {}), timeout=3
            )
            in_transaction = await asyncio.wait_for(database.transaction(_one), timeout=3)
            return after, in_transaction
        finally:
            await database.close()

    after, in_transaction = asyncio.run(run())
    assert after == {"n": 1}
    assert in_transaction == 1


def _one(*, session: Session) -> int:
    return int(session.execute(text("SELECT 1")).scalar_one())
