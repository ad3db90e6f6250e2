"""Request-scoped dependencies: the database, the publisher, the caller's address."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Depends, Request

from app.core.db import session_factory
from app.tasks.publisher import Publisher

# The version prefix; each domain router carries it so routes know their full template.
API_V1 = "/api/v1"

T = TypeVar("T")


class Database:
    """A request's database work, run as one unit in one thread-pool hand-off.

    Routes are async and everything around them (auth, scopes, rate limits) runs on the event
    loop; only the blocking SQLAlchemy work goes to a thread. FastAPI would otherwise hand every
    synchronous dependency to the pool separately, and those hand-offs, not the database, were
    most of a request's time (bench/README.md). Write routes use `write`, which commits at
    the boundary, before they publish.
    """

    def __init__(self, *, threads: int) -> None:
        self.threads = threads
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """Call `work(session=..., **kwargs)` in a thread; the session is closed in that thread.

        Anything not committed is rolled back: a failed request leaves nothing half-written.
        """
        return await anyio.to_thread.run_sync(
            _in_session, work, kwargs, False, limiter=self.limiter
        )

    async def write(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """As `run`, and commit when the work returns: the request's boundary, in the thread."""
        return await anyio.to_thread.run_sync(_in_session, work, kwargs, True, limiter=self.limiter)

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # No more threads than pooled connections: a request past that waits on the event loop,
        # not in a thread that would open (and then close) an overflow connection.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.threads)
        return self._limiter


def _in_session(work: Callable[..., T], kwargs: dict[str, Any], commit: bool) -> T:
    with session_factory()() as session:
        result = work(session=session, **kwargs)
        if commit:
            session.commit()
        return result


async def get_database(request: Request) -> Database:
    database: Database = request.app.state.database
    return database


def client_address(request: Request) -> str:
    """The client's IP as uvicorn resolved it (X-Forwarded-For only from trusted proxies)."""
    return request.client.host if request.client else "unknown"


async def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


DatabaseDep = Annotated[Database, Depends(get_database)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
