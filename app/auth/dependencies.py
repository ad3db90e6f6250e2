"""Who is calling, and may they? Every /api route depends on these (see app/api/router.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import DatabaseDep, client_address
from app.auth import service
from app.auth.exceptions import MissingScope, NotAuthenticated
from app.auth.service import ANONYMOUS, Principal, Scope

bearer = HTTPBearer(auto_error=False, description="An API key from `taskdock keys create`.")


async def get_principal(
    request: Request,
    database: DatabaseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if not request.app.state.settings.auth_enabled:
        return ANONYMOUS
    principal = None
    if credentials is not None and credentials.credentials:
        principal = await database.autocommit(service.authenticate, plain=credentials.credentials)
    if principal is None:
        # Every refused attempt counts against the client's address: guessing keys gets 429.
        await request.app.state.rate_limiter.hit("auth_failures", f"ip:{client_address(request)}")
        if credentials is None or not credentials.credentials:
            raise NotAuthenticated()
        raise NotAuthenticated("the API key is unknown or revoked")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    # Async although it never waits: FastAPI runs a plain `def` dependency in the thread pool.
    async def check(principal: PrincipalDep) -> Principal:
        if not principal.allows(scope):
            raise MissingScope(f"this API key lacks the {scope.value!r} scope", scope=scope.value)
        return principal

    return check


CanSubmit = Annotated[Principal, Depends(require(Scope.SUBMIT))]
CanRead = Annotated[Principal, Depends(require(Scope.READ))]


def owner_filter(principal: Principal) -> str | None:
    """The owner a query is limited to; None lets an admin see every owner's tasks."""
    return None if principal.admin else principal.owner
