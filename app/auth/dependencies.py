"""Who is calling, and may they? Every /api route takes `CanRead` or `CanSubmit`, and
app/api/router.py refuses to build a route that takes neither."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPBearer

from app.api.deps import Database, client_address
from app.auth import service
from app.auth.exceptions import MissingScope, NotAuthenticated
from app.auth.service import ANONYMOUS, KeyCache, Principal, Scope


class Access(HTTPBearer):
    """The caller, if its API key has `scope`, counted against the rate limit named `limit`.

    The key check, the scope and the rate limit are one dependency: FastAPI solves a node per
    dependency on every request, and the three (with the bearer scheme and a router-wide
    principal) were a tenth of a poll's CPU. Being the bearer scheme itself (HTTPBearer, whose
    header parsing it reuses), it is what the OpenAPI document shows as the routes' security.
    """

    def __init__(self, scope: Scope, limit: str) -> None:
        super().__init__(
            auto_error=False,
            scheme_name="HTTPBearer",
            description="An API key from `taskdock keys create`.",
        )
        self.scope = scope
        self.limit = limit

    async def __call__(  # type: ignore[override]
        self, request: Request, response: Response
    ) -> Principal:
        principal = await self.principal(request)
        if not principal.allows(self.scope):
            raise MissingScope(
                f"this API key lacks the {self.scope.value!r} scope", scope=self.scope.value
            )
        identity = f"key:{principal.owner}" if principal.owner else f"ip:{client_address(request)}"
        response.headers.update(await request.app.state.rate_limiter.hit(self.limit, identity))
        return principal

    async def principal(self, request: Request) -> Principal:
        state = request.app.state
        if not state.settings.auth_enabled:
            return ANONYMOUS
        credentials = await super().__call__(request)
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
            await state.rate_limiter.hit("auth_failures", f"ip:{client_address(request)}")
            if credentials is None or not credentials.credentials:
                raise NotAuthenticated()
            raise NotAuthenticated("the API key is unknown or revoked")
        return principal


# Submit, cancel and retry count against the submit limit; reads against the read limit.
CanSubmit = Annotated[Principal, Depends(Access(Scope.SUBMIT, "submit"))]
CanRead = Annotated[Principal, Depends(Access(Scope.READ, "read"))]


def owner_filter(principal: Principal) -> str | None:
    """The owner a query is limited to; None lets an admin see every owner's tasks."""
    return None if principal.admin else principal.owner
