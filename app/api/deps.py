"""Request-scoped dependencies: the database session, the publisher, the caller."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.db import session_factory
from app.tasks.publisher import Publisher

# The version prefix; each domain router carries it so routes know their full template.
API_V1 = "/api/v1"


def get_db() -> Iterator[Session]:
    """A session per request; write routes commit themselves, before they publish."""
    session = session_factory()()
    try:
        yield session
    finally:
        # Anything uncommitted is rolled back: a failed request leaves nothing half-written.
        session.close()


def client_address(request: Request) -> str:
    """The client's IP as uvicorn resolved it (X-Forwarded-For only from trusted proxies)."""
    return request.client.host if request.client else "unknown"


def get_publisher(request: Request) -> Publisher:
    publisher: Publisher = request.app.state.publisher
    return publisher


SessionDep = Annotated[Session, Depends(get_db)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
