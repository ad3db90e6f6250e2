"""The one pure-ASGI middleware around every HTTP request: its metrics, its id, its body limit.

One layer rather than three because each layer costs a coroutine, a wrapped `send` and a walk
of the headers on every request, and a poll is mostly such overhead. A request, outside in:

1. Metrics: the in-progress gauge while it runs; then its count and latency by method, route
   template (never the raw path: `<unmatched>` when no route took it) and status, 500 when it
   raised before answering. Everything below is measured, the 413s and the guards' answers too.
2. Request id: X-Request-ID from the client when sane, else a new uuid4 hex; set in the
   `request_id` ContextVar and in `log_context` while the request runs, and in the answer.
3. Guards: TrustedHost and CORS when configured, run inside the id and outside the body limit,
   so a wrong Host is refused before the limit is looked at, and a 413 gets CORS headers.
4. Body limit: a declared Content-Length over the limit is refused (413) before anything reads
   the body; a body that may come without one (chunked) is counted as it arrives, and the
   BodyTooLarge raised then becomes a 413 unless the answer has started.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core import metrics
from app.core.logging import log_context

HEADER = "X-Request-ID"
# ASGI gives and takes header names in lower case.
_ID_HEADER = HEADER.lower().encode("latin-1")
# A client may pick its id, but not one that could forge log lines or fill them. Matched on the
# raw bytes, which is matching their latin-1 text (one character a byte) without decoding first.
_SAFE = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
# uuid4's version and variant bits, set without building a UUID object (half the cost).
_UUID4_CLEAR = ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)
# HTTP/1.x framing: without these headers a request has no body (RFC 9112 6.3).
_FRAMED = ("1.0", "1.1")

# A metric label per method a client invents would grow the series without bound.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

Guard = Callable[[ASGIApp], ASGIApp]
MetricT = TypeVar("MetricT", bound=MetricWrapperBase)


def current_request_id() -> str | None:
    return request_id.get()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body exceeds {limit} bytes")


class RequestMiddleware:
    """Metrics, request id and body limit for every HTTP request, around the guards and the app."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, guards: Sequence[Guard] = ()) -> None:
        self.max_bytes = max_bytes
        self.app = _guarded(app, guards)
        # The 413 is an app of its own so that it passes the guards as any answer does.
        self.refuse = _guarded(_Refusal(max_bytes), guards)
        # prometheus-client's labels() validates and locks on every call; the children it
        # returns are the same objects each time, so they are looked up here instead.
        self._in_progress: dict[tuple[str, ...], Gauge] = {}
        self._requests: dict[tuple[str, ...], Counter] = {}
        self._latency: dict[tuple[str, ...], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        given: bytes | None = None
        length: bytes | None = None
        chunked = False
        # The first of each header counts, as it did when each layer looked for its own.
        for name, value in scope["headers"]:
            if name == _ID_HEADER:
                if given is None:
                    given = value
            elif name == b"content-length":
                if length is None:
                    length = value
            elif name == b"transfer-encoding":
                chunked = True
        if given is None or not _SAFE.fullmatch(given):
            given = _new_id().encode("latin-1")
        rid = given.decode("latin-1")
        id_header = (_ID_HEADER, given)
        status: int | None = None

        async def send_answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                # A new list: the one given may be a Response's own, sent again later. Nothing
                # inside sets X-Request-ID (this layer owns it), so there is none to replace.
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        method: str = scope["method"] if scope["method"] in _METHODS else "OTHER"
        in_progress = _child(self._in_progress, metrics.HTTP_IN_PROGRESS, method)
        in_progress.inc()
        id_token = request_id.set(rid)
        log_token = log_context.set({**(log_context.get() or {}), "request_id": rid})
        try:
            if _declared(length) > self.max_bytes:
                await self.refuse(scope, receive, send_answer)
            elif length is not None or chunked or scope.get("http_version") not in _FRAMED:
                await self.app(scope, self._counting(receive), send_answer)
            else:
                await self.app(scope, receive, send_answer)
        except BodyTooLarge:
            if status is not None:
                raise
            await self.refuse(scope, receive, send_answer)
        finally:
            log_context.reset(log_token)
            request_id.reset(id_token)
            in_progress.dec()
            route = getattr(scope.get("route"), "path", None) or "<unmatched>"
            code = str(status or 500)
            _child(self._requests, metrics.HTTP_REQUESTS, method, route, code).inc()
            elapsed = time.perf_counter() - began
            _child(self._latency, metrics.HTTP_LATENCY, method, route).observe(elapsed)

    def _counting(self, receive: Receive) -> Receive:
        """`receive`, refusing the body once more than the limit has come (chunked bodies)."""
        limit = self.max_bytes
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        return counting_receive


class _Refusal:
    """The 413 answer, built once."""

    def __init__(self, limit: int) -> None:
        self.body = json.dumps(
            {"code": "payload_too_large", "message": f"request body exceeds {limit} bytes"}
        ).encode()
        self.headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            # So the server stops reading the rest of a huge body.
            (b"connection", b"close"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 413, "headers": list(self.headers)}
        await send(start)
        await send({"type": "http.response.body", "body": self.body})


def _guarded(app: ASGIApp, guards: Sequence[Guard]) -> ASGIApp:
    """`app` inside the guards, the first one outermost."""
    for guard in reversed(guards):
        app = guard(app)
    return app


def _declared(length: bytes | None) -> int:
    """The Content-Length as a number; -1 when absent or not a number (nothing to refuse)."""
    if length is None:
        return -1
    try:
        return int(length)
    except ValueError:
        return -1


def _new_id() -> str:
    value = int.from_bytes(os.urandom(16), "big") & _UUID4_CLEAR | _UUID4_SET
    return f"{value:032x}"


def _child(cache: dict[tuple[str, ...], MetricT], metric: MetricT, *labels: str) -> MetricT:
    child = cache.get(labels)
    if child is None:
        child = cache[labels] = metric.labels(*labels)
    return child
