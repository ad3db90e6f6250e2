"""Request-scoped dependencies: the database, the publisher, the caller's address."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import (
    DatabaseFileGone,
    Statements,
    build_async_engine,
    session_factory,
    sqlite_file_problem,
)
from app.tasks.publication import Submitter

# The version prefix; each domain router carries it so routes know their full template.
API_V1 = "/api/v1"

T = TypeVar("T")


class Database:
    """A request's database work, run as one unit.

    Routes are async and everything around them (auth, scopes, rate limits) runs on the event
    loop. On PostgreSQL the unit runs there too, on psycopg's asyncio side: the service
    functions stay synchronous and get a Session whose round trips await the event loop
    (SQLAlchemy's `AsyncSession.run_sync`), so no request needs a thread. SQLite's driver has
    no asyncio side here, so its units run in one thread-pool hand-off each. Either way the
    unit has committed when the call returns (the request's boundary), before any publish.
    """

    def __init__(self, *, settings: Settings) -> None:
        self.settings = settings
        self._limiter: anyio.CapacityLimiter | None = None
        self._engine: AsyncEngine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._autocommit: async_sessionmaker[AsyncSession] | None = None
        self._statements: Statements | None = None

    async def autocommit(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """Call `work(session=..., **kwargs)`, each statement committed as it runs.

        For reads, and for work whose only write is one statement (a submit's INSERT, a mark):
        on PostgreSQL that saves the BEGIN and COMMIT (or ROLLBACK) round trips, and changes
        nothing else, since READ COMMITTED gives every statement its own snapshot anyway and a
        single statement is atomic. SQLite runs it as one transaction in a thread.
        """
        if self.settings.embedded:
            return await self._in_thread(work, kwargs)
        _, autocommit = self._async_sessions()
        async with autocommit() as session:
            return await session.run_sync(_call, work, kwargs)

    async def transaction(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """As `autocommit`, in one transaction committed when the work returns.

        For work that writes more than one statement. Anything not committed is rolled back:
        a failed request leaves nothing half-written.
        """
        if self.settings.embedded:
            return await self._in_thread(work, kwargs)
        transactions, _ = self._async_sessions()
        async with transactions() as session:
            result = await session.run_sync(_call, work, kwargs)
            await session.commit()
            return result

    async def fetch_one(
        self, statement: Executable, parameters: dict[str, Any]
    ) -> Mapping[str, Any] | None:
        """The first row of a Core SELECT, as a mapping: no Session, no ORM object.

        For the hottest reads (a task by id): on PostgreSQL one round trip on a pooled
        connection in autocommit, and nothing else.
        """
        if self.settings.embedded:
            return await self._in_thread(
                _fetch_one, {"statement": statement, "parameters": parameters}
            )
        return await (await self._fast()).fetch_one(statement, parameters)

    async def execute_many(self, statement: Executable, rows: list[dict[str, Any]]) -> None:
        """One statement for many rows (the group commit's INSERT), committed on return."""
        if self.settings.embedded:
            await self._in_thread(_execute_many, {"statement": statement, "rows": rows})
            return
        await (await self._fast()).execute_many(statement, rows)

    async def _in_thread(self, work: Callable[..., T], kwargs: dict[str, Any]) -> T:
        return await anyio.to_thread.run_sync(_in_session, work, kwargs, limiter=self.limiter)

    @property
    def engine(self) -> AsyncEngine | None:
        """The asyncio engine in use (PostgreSQL only, once a request has used it)."""
        return self._engine

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # No more threads than pooled connections: a request past that waits on the event loop,
        # not in a thread that would open (and then close) an overflow connection.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.database_pool_size)
        return self._limiter

    def _async_sessions(
        self,
    ) -> tuple[async_sessionmaker[AsyncSession], async_sessionmaker[AsyncSession]]:
        # An asyncio pool belongs to the event loop it was made on; a server has one loop, a
        # test client may start several in turn, and each gets a pool of its own.
        loop = asyncio.get_running_loop()
        if self._sessions is None or self._autocommit is None or self._loop is not loop:
            self._drop_engine()
            engine = build_async_engine(self.settings, role="api")
            self._engine, self._loop = engine, loop
            self._sessions = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
            self._autocommit = async_sessionmaker(
                engine.execution_options(isolation_level="AUTOCOMMIT"),
                expire_on_commit=False,
                autoflush=False,
            )
        return self._sessions, self._autocommit

    async def _fast(self) -> Statements:
        """The hot statements' runner (app.core.db.Statements), on this loop's engine."""
        _, autocommit = self._async_sessions()  # on a new event loop, a new engine
        if self._statements is None:
            engine = autocommit.kw["bind"]
            self._statements = Statements(engine)
        return self._statements

    def _drop_engine(self) -> None:
        if self._engine is not None:
            # Its connections belong to another loop: forget them without touching them.
            self._engine.sync_engine.dispose(close=False)
        self._engine = self._loop = self._sessions = self._autocommit = None
        self._statements = None

    async def close(self) -> None:
        if self._engine is not None and self._loop is asyncio.get_running_loop():
            await self._engine.dispose()
        self._drop_engine()


def _call(session: Session, work: Callable[..., T], kwargs: dict[str, Any]) -> T:
    return work(session=session, **kwargs)


def _fetch_one(
    *, session: Session, statement: Executable, parameters: dict[str, Any]
) -> Mapping[str, Any] | None:
    row = session.execute(statement, parameters).mappings().first()
    return dict(row) if row is not None else None


def _execute_many(*, session: Session, statement: Executable, rows: list[dict[str, Any]]) -> None:
    session.execute(statement, rows)


def _in_session(work: Callable[..., T], kwargs: dict[str, Any]) -> T:
    with session_factory()() as session:
        result = work(session=session, **kwargs)
        session.commit()
        # Committed to the file this process opened; if that file is no longer the database
        # (its data directory was deleted), the work is as good as lost: no 2xx for it.
        problem = sqlite_file_problem(session.get_bind().engine.url.database or "")
        if problem is not None:
            raise DatabaseFileGone(problem)
        return result


async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def client_address(request: Request) -> str:
    """The client's IP as uvicorn resolved it (X-Forwarded-For only from trusted proxies)."""
    return request.client.host if request.client else "unknown"


async def get_submitter(request: Request) -> Submitter:
    submitter: Submitter = request.app.state.submitter
    return submitter


DatabaseDep = Annotated[Database, Depends(get_database)]
SubmitterDep = Annotated[Submitter, Depends(get_submitter)]
