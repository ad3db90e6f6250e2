"""Who is calling, and may they? Every /api route depends on these (see app/api/router.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.deps import Database, client_address
from app.auth import service
from app.auth.exceptions import MissingScope, NotAuthenticated
from app.auth.service import ANONYMOUS, KeyCache, Principal, Scope

bearer = HTTPBearer(auto_error=False, description="An API key from `taskdock keys create`.")


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    state = request.app.state
    if not state.settings.auth_enabled:
        return ANONYMOUS
    principal = None
    if credentials is not None and credentials.credentials:
        plain = credentials.credentials
        cache: KeyCache = state.key_cache
        principal = cache.get(plain)
        if principal is None:
            database: Database = state.database
            principal = await database.autocommit(service.authenticate, plain=plain)
            if principal is not None:
                cache.put(plain, principal)
    if principal is None:
        # Every refused attempt counts against the client's address: guessing keys gets 429.
        await request.app.state.rate_limiter.hit("auth_failures", f"ip:{client_address(request)}")
        if credentials is None or not credentials.credentials:
            raise NotAuthenticated()
        raise NotAuthenticated("the API key is unknown or revoked")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def access(scope: Scope, limit: str) -> Callable[..., Awaitable[Principal]]:
    """The caller, if its key has `scope`, counted against the rate limit named `limit`.

    One dependency for both, so a request solves as few of FastAPI's dependency nodes as it can.
    """

    async def check(request: Request, response: Response, principal: PrincipalDep) -> Principal:
        if not principal.allows(scope):
            raise MissingScope(f"this API key lacks the {scope.value!r} scope", scope=scope.value)
        identity = f"key:{principal.owner}" if principal.owner else f"ip:{client_address(request)}"
        response.headers.update(await request.app.state.rate_limiter.hit(limit, identity))
        return principal

    return check


# Submit, cancel and retry count against the submit limit; reads against the read limit.
CanSubmit = Annotated[Principal, Depends(access(Scope.SUBMIT, "submit"))]
CanRead = Annotated[Principal, Depends(access(Scope.READ, "read"))]


def owner_filter(principal: Principal) -> str | None:
    """The owner a query is limited to; None lets an admin see every owner's tasks."""
    return None if principal.admin else principal.owner
