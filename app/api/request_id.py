"""X-Request-ID: taken from the client (when sane) or generated, echoed, and logged."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logging import log_context

HEADER = "X-Request-ID"
# A client may pick its id, but not one that could forge log lines or fill them.
_SAFE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    return request_id.get()


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name == b"x-request-id"
            ),
            "",
        )
        rid = given if _SAFE.match(given) else uuid.uuid4().hex
        id_token = request_id.set(rid)
        log_token = log_context.set({**(log_context.get() or {}), "request_id": rid})

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = rid
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log_context.reset(log_token)
            request_id.reset(id_token)
