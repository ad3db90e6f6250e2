"""The request middleware (app/api/middleware.py): ids, the body limit and the HTTP metrics,
alone around small ASGI apps, and as create_app wires it with the CORS and Host guards."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import Receive, Scope, Send

from app.api.middleware import BodyTooLarge, Guard, RequestMiddleware, current_request_id
from app.core import metrics
from app.core.logging import log_context
from tests.conftest import migrate_now
from tests.support.stack import base_env

LIMIT = 1024
ORIGIN = "https://app.example.test"
REFUSED = {"code": "payload_too_large", "message": f"request body exceeds {LIMIT} bytes"}


def counted(method: str, route: str, status: str) -> float:
    wanted = {"method": method, "route": route, "status": status}
    for family in metrics.HTTP_REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == wanted:
                return sample.value
    return 0.0


def chunks(size: int) -> Iterator[bytes]:
    """A body without a Content-Length: httpx sends it chunked."""
    for _ in range(size // 256):
        yield b"x" * 256


class ReadAll:
    """Reads the whole body, then answers its size; remembers what it saw of the request.

    HTTP only (no lifespan), so its TestClients are used without `with`."""

    def __init__(self, *, answer_first: bool = False) -> None:
        self.answer_first = answer_first
        self.calls = 0
        self.seen: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.seen = {"request_id": current_request_id(), "log_context": log_context.get()}
        if self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        size, more = 0, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        if not self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


def test_a_chunked_body_over_the_limit_is_a_413_with_the_request_id() -> None:
    app = ReadAll()
    before = counted("POST", "<unmatched>", "413")
    client = TestClient(RequestMiddleware(app, max_bytes=LIMIT))
    refused = client.post("/", content=chunks(4 * LIMIT), headers={"X-Request-ID": "big-1"})
    within = client.post("/", content=chunks(LIMIT))

    assert refused.status_code == 413
    assert refused.json() == REFUSED
    assert refused.headers["x-request-id"] == "big-1"
    assert refused.headers["connection"] == "close"
    assert counted("POST", "<unmatched>", "413") - before == 1
    assert within.status_code == 200
    assert within.text == str(LIMIT)


def test_a_declared_length_over_the_limit_is_refused_before_the_app_runs() -> None:
    app = ReadAll()
    client = TestClient(RequestMiddleware(app, max_bytes=LIMIT))
    refused = client.post("/", content=b"x" * (LIMIT + 1))
    exact = client.post("/", content=b"x" * LIMIT)

    assert refused.status_code == 413
    assert refused.json() == REFUSED
    assert uuid.UUID(refused.headers["x-request-id"]).version == 4
    assert app.calls == 1  # the request at the limit only
    assert exact.text == str(LIMIT)


def test_a_body_over_the_limit_after_the_answer_started_is_raised() -> None:
    app = ReadAll(answer_first=True)
    before = counted("POST", "<unmatched>", "200")
    client = TestClient(RequestMiddleware(app, max_bytes=LIMIT))
    with pytest.raises(BodyTooLarge):
        client.post("/", content=chunks(4 * LIMIT))

    # Counted with the status the client was sent.
    assert counted("POST", "<unmatched>", "200") - before == 1


def test_the_request_id_is_set_for_the_request_and_reset_after() -> None:
    app = ReadAll()
    middleware = RequestMiddleware(app, max_bytes=LIMIT)
    after: list[tuple[object, object]] = []

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        await middleware(scope, receive, send)
        after.append((current_request_id(), log_context.get()))

    client = TestClient(outer)
    generated = client.get("/")
    generated_seen = app.seen
    twice = client.get("/", headers=[("X-Request-ID", "first"), ("X-Request-ID", "second")])
    twice_seen = app.seen
    forged = client.get("/", headers={"X-Request-ID": "a b"})

    rid = generated.headers["x-request-id"]
    assert uuid.UUID(rid).version == 4
    assert uuid.UUID(rid).hex == rid
    assert generated_seen == {"request_id": rid, "log_context": {"request_id": rid}}
    assert twice.headers["x-request-id"] == "first"
    assert twice.headers.get_list("x-request-id") == ["first"]
    assert twice_seen["request_id"] == "first"
    assert len(forged.headers["x-request-id"]) == 32
    assert after == [(None, None)] * 3


def test_an_id_ending_in_a_newline_is_replaced_and_an_invented_method_is_labelled_other() -> None:
    # Raw ASGI, since an HTTP client would refuse to send either.
    app = ReadAll()
    middleware = RequestMiddleware(app, max_bytes=LIMIT)
    sent: list[dict[str, Any]] = []
    scope = {
        "type": "http",
        "method": "BREW",
        "path": "/",
        "http_version": "1.1",
        "headers": [(b"x-request-id", b"abc\n")],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    before = counted("OTHER", "<unmatched>", "200")
    asyncio.run(middleware(scope, receive, send))

    headers = dict(sent[0]["headers"])
    assert headers[b"x-request-id"] != b"abc\n"
    assert uuid.UUID(headers[b"x-request-id"].decode()).version == 4
    assert counted("OTHER", "<unmatched>", "200") - before == 1
    assert counted("BREW", "<unmatched>", "200") == 0


def test_the_guards_answer_inside_the_id_and_outside_the_limit() -> None:
    guards: list[Guard] = [
        partial(TrustedHostMiddleware, allowed_hosts=["testserver"]),
        partial(CORSMiddleware, allow_origins=[ORIGIN]),
    ]
    app = ReadAll()
    before = counted("POST", "<unmatched>", "400")
    client = TestClient(RequestMiddleware(app, max_bytes=LIMIT, guards=guards))
    refused = client.post("/", content=b"x" * (LIMIT + 1), headers={"Origin": ORIGIN})
    other_host = client.post("/", content=b"x" * (LIMIT + 1), headers={"Host": "evil.test"})

    # The 413 passes the CORS guard, so a browser may read it.
    assert refused.status_code == 413
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    assert refused.headers["x-request-id"]
    # The Host is refused before the body's size is looked at.
    assert other_host.status_code == 400
    assert other_host.headers["x-request-id"]
    assert counted("POST", "<unmatched>", "400") - before == 1
    assert app.calls == 0


@pytest.fixture
def guarded(tmp_path: Path, configure: object) -> Iterator[TestClient]:
    from app.main import create_app

    env = base_env(
        tmp_path / "data",
        TASKDOCK_ALLOWED_HOSTS="api.example.test,testserver",
        TASKDOCK_CORS_ORIGINS=ORIGIN,
        TASKDOCK_MAX_BODY_BYTES=str(LIMIT * 4),
    )
    configure(env)  # type: ignore[operator]
    migrate_now()
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def test_the_app_refuses_a_chunked_body_with_cors_headers_an_id_and_a_count(
    guarded: TestClient,
) -> None:
    body = json.dumps({"type": "process_data", "payload": {"user_id": 1, "data": "x" * 8192}})
    before = counted("POST", "/api/v1/tasks", "413")

    response = guarded.post(
        "/api/v1/tasks",
        content=iter([body.encode()[:100], body.encode()[100:]]),
        headers={"Content-Type": "application/json", "Origin": ORIGIN, "X-Request-ID": "big-2"},
    )

    assert response.status_code == 413, response.text
    assert response.json()["code"] == "payload_too_large"
    assert response.headers["x-request-id"] == "big-2"
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert counted("POST", "/api/v1/tasks", "413") - before == 1
    # A declared length over the limit: refused before any route is matched.
    declared_before = counted("POST", "<unmatched>", "413")
    declared = guarded.post(
        "/api/v1/tasks",
        content=body,
        headers={"Content-Type": "application/json", "Origin": ORIGIN},
    )
    assert declared.status_code == 413
    assert declared.headers["access-control-allow-origin"] == ORIGIN
    assert declared.json() == {
        "code": "payload_too_large",
        "message": f"request body exceeds {LIMIT * 4} bytes",
    }
    assert declared.headers["x-request-id"]
    assert counted("POST", "<unmatched>", "413") - declared_before == 1
