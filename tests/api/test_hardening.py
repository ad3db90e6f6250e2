"""Hostile input: huge, nested, malformed bodies; Host headers; CORS; docs in production."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import migrate_now
from tests.support.stack import base_env, running_stack, taskdock


def make_client(
    tmp_path: Path, configure: object, *, migrate: bool = True, **settings: str
) -> TestClient:
    from app.main import create_app

    configure(base_env(tmp_path / "data", **settings))  # type: ignore[operator]
    if migrate:
        migrate_now()
    return TestClient(create_app(), raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "application/json", 400),  # nested 200,000 deep
        (b"\xff\xfe\x00garbage", "application/json", 422),
        (b"type=process_data", "application/x-www-form-urlencoded", 415),
        (b'{"type": "process_data", "payload": {"user_id": 1, "data": "x"}}', "text/plain", 415),
        (b'{"type": "' + b"x" * 900_000 + b'"}', "application/json", 422),
    ],
)
def test_malformed_bodies_are_4xx_never_5xx(
    embedded_client: TestClient, body: bytes, content_type: str, status: int
) -> None:
    response = embedded_client.post(
        "/api/v1/tasks", content=body, headers={"content-type": content_type}
    )

    assert response.status_code == status, response.text
    assert response.json()["code"] in {"validation_error", "bad_request", "unsupported_media_type"}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_100_mb_body_is_refused_before_it_is_read(tmp_path: Path, framing: str) -> None:
    env = base_env(tmp_path / "data")
    assert taskdock("migrate", env=env).returncode == 0
    with running_stack(env, tmp_path / "logs") as stack:
        api, base = stack.api()
        before = rss_kib(api.pid)
        port = int(base.rsplit(":", 1)[1])
        size = 100 * 1024 * 1024
        head = "POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        head += (
            f"Content-Length: {size}\r\n\r\n"
            if framing == "content-length"
            else "Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        sent = 0
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head.encode())
            try:
                while sent < size:
                    data = chunk if framing == "content-length" else b"10000\r\n" + chunk + b"\r\n"
                    sock.sendall(data)
                    sent += len(chunk)
            except OSError:
                pass  # the server stopped reading and closed: what it should do
            sock.settimeout(10)
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
        after = rss_kib(api.pid)

    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < size  # refused long before the 100 MB were sent
    assert after - before < 20 * 1024, (before, after)


@pytest.fixture
def guarded(tmp_path: Path, configure: object) -> Iterator[TestClient]:
    with make_client(
        tmp_path,
        configure,
        TASKDOCK_ALLOWED_HOSTS="api.example.test,testserver",
        TASKDOCK_CORS_ORIGINS="https://app.example.test",
    ) as client:
        yield client


def test_other_host_header_is_400(guarded: TestClient) -> None:
    assert guarded.get("/health/live", headers={"Host": "api.example.test"}).status_code == 200
    assert guarded.get("/health/live", headers={"Host": "evil.test"}).status_code == 400


def test_cors_only_for_configured_origins(guarded: TestClient, embedded_client: TestClient) -> None:
    allowed = guarded.options(
        "/api/v1/tasks",
        headers={"Origin": "https://app.example.test", "Access-Control-Request-Method": "POST"},
    )
    other = guarded.options(
        "/api/v1/tasks",
        headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
    )
    off = embedded_client.get("/health/live", headers={"Origin": "https://app.example.test"})

    assert allowed.headers["access-control-allow-origin"] == "https://app.example.test"
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in off.headers  # CORS is off unless configured


def test_docs_are_off_in_production(tmp_path: Path, configure: object) -> None:
    with make_client(
        tmp_path,
        configure,
        migrate=False,
        TASKDOCK_ENVIRONMENT="production",
        TASKDOCK_DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
        TASKDOCK_BROKER_URL="redis://127.0.0.1:1/0",
    ) as client:
        codes = [client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")]
    assert codes == [404, 404, 404]


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_names_the_content_type(
    embedded_client: TestClient, content_type: str
) -> None:
    """curl -d without -H 'content-type: application/json' sends a form: say so."""
    body = b'{"type": "process_data", "payload": {"user_id": 1, "data": "x"}}'
    response = embedded_client.post(
        "/api/v1/tasks", content=body, headers={"content-type": content_type}
    )

    assert response.status_code == 415, response.text
    assert response.json()["code"] == "unsupported_media_type"
    assert "Content-Type must be application/json" in response.json()["message"]
    assert content_type in response.json()["message"]
    # JSON with a charset, or a +json type, is JSON.
    for json_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        accepted = embedded_client.post(
            "/api/v1/tasks", content=body, headers={"content-type": json_type}
        )
        assert accepted.status_code == 202, accepted.text


def test_every_error_has_the_one_documented_shape(embedded_client: TestClient) -> None:
    from app.core.errors import ErrorBody

    key = {"Idempotency-Key": "shape-1"}
    first = embedded_client.post(
        "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 0}}, headers=key
    )
    queued = embedded_client.post(
        "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 0}, "countdown": 600}
    ).json()
    assert embedded_client.post(f"/api/v1/tasks/{queued['id']}/cancel").status_code == 200
    answers = {
        "unknown task": embedded_client.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000"),
        "unknown route": embedded_client.get("/api/v1/nothing-here"),
        "wrong method": embedded_client.delete("/api/v1/tasks"),
        "key reused": embedded_client.post(
            "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 1}}, headers=key
        ),
        "cancel twice": embedded_client.post(f"/api/v1/tasks/{queued['id']}/cancel"),
        "form body": embedded_client.post(
            "/api/v1/tasks",
            content=b"a=1",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        "bad payload": embedded_client.post(
            "/api/v1/tasks", json={"type": "process_data", "payload": {"user_id": "x"}}
        ),
    }

    statuses = {name: response.status_code for name, response in answers.items()}
    assert statuses == {
        "unknown task": 404,
        "unknown route": 404,
        "wrong method": 405,
        "key reused": 409,
        "cancel twice": 409,
        "form body": 415,
        "bad payload": 422,
    }
    for name, response in answers.items():
        body = ErrorBody.model_validate(response.json())  # extra members are refused
        assert body.code, name
        assert body.message, name
    assert answers["key reused"].json()["task_id"] == first.json()["id"]
    assert answers["cancel twice"].json()["status"] == "CANCELLED"


def test_the_document_describes_every_error_answer_as_the_one_shape(
    embedded_client: TestClient,
) -> None:
    from app.core.errors import ErrorBody

    document = embedded_client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    errors = {
        (path, method, status): answer
        for path, operations in document["paths"].items()
        if path.startswith("/api/")
        for method, operation in operations.items()
        for status, answer in operation["responses"].items()
        if status[0] in "45"
    }

    # Every route's 4xx and 5xx answers, as JSON (the event stream's too: its errors are not
    # events), by a reference that the document resolves to ErrorBody.
    assert len(errors) > 100
    for where, answer in errors.items():
        assert answer["content"] == {
            "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
        }, where
    assert set(schemas["ErrorBody"]["properties"]) == set(ErrorBody.model_fields)
    assert refs(document) <= {f"#/components/schemas/{name}" for name in schemas}


def refs(node: object) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return found.union(*(refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(value) for value in node))
    return set()
