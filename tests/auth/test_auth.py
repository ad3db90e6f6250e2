"""API keys: every /api route needs one, scopes limit it, and a key sees only its own tasks."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import APIRouter
from fastapi.testclient import TestClient

from app.api.router import ROUTERS, unguarded
from app.auth import service
from app.auth.dependencies import CanRead
from app.auth.service import Scope
from app.core.db import session_scope
from tests.conftest import migrate_now
from tests.support.stack import base_env, taskdock

PROCESS = {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}


@pytest.fixture
def auth_env(tmp_path: Path, configure: object) -> dict[str, str]:
    env = base_env(tmp_path / "data", TASKDOCK_AUTH_ENABLED="true")
    configure(env)  # type: ignore[operator]
    migrate_now()
    return env


@pytest.fixture
def api(auth_env: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def new_key(*scopes: Scope, name: str = "client") -> dict[str, str]:
    with session_scope() as session:
        _, plain = service.create(session=session, name=name, scopes=list(scopes))
    return {"Authorization": f"Bearer {plain}"}


def test_api_routes_need_a_key(api: TestClient) -> None:
    for method, path in [
        ("POST", "/api/v1/tasks"),
        ("GET", "/api/v1/tasks"),
        ("GET", f"/api/v1/tasks/{uuid.uuid4()}"),
        ("POST", f"/api/v1/tasks/{uuid.uuid4()}/cancel"),
        ("POST", f"/api/v1/tasks/{uuid.uuid4()}/retry"),
        ("GET", "/api/v1/task-types"),
    ]:
        response = api.request(method, path, json=PROCESS if method == "POST" else None)
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["code"] == "not_authenticated"
        assert response.headers["www-authenticate"] == "Bearer"


def test_every_documented_api_route_needs_a_key_and_shows_the_bearer_scheme(
    api: TestClient,
) -> None:
    document = api.get("/openapi.json").json()
    assert document["components"]["securitySchemes"] == {
        "HTTPBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `taskdock keys create`.",
        }
    }
    operations = [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        if path.startswith("/api/")
        for method, operation in item.items()
    ]
    assert len(operations) >= 15
    some_id = str(uuid.uuid4())
    for method, path, operation in operations:
        assert operation["security"] == [{"HTTPBearer": []}], (method, path)
        concrete = path.replace("{task_id}", some_id).replace("{schedule_id}", some_id)
        response = api.request(method, concrete, json={} if method != "GET" else None)
        assert response.status_code == 401, (method, path, response.text)


def test_an_api_route_that_takes_no_key_check_is_never_built() -> None:
    assert sum(len(router.routes) for router in ROUTERS) >= 15
    assert unguarded(ROUTERS) == []

    router = APIRouter()

    @router.get("/guarded")
    async def guarded(_: CanRead) -> None: ...

    @router.get("/forgotten")
    async def forgotten() -> None: ...

    assert unguarded((router,)) == ["['GET'] /forgotten"]


def revoke(headers: dict[str, str]) -> None:
    with session_scope() as session:
        service.revoke(session=session, key=headers["Authorization"].split("_")[1])


def test_unknown_and_revoked_keys_are_refused(api: TestClient) -> None:
    api.app.state.key_cache.seconds = 0  # type: ignore[attr-defined]
    wrong = api.get("/api/v1/tasks", headers={"Authorization": "Bearer tdk_00000000_nope"})
    headers = new_key(Scope.READ)
    assert api.get("/api/v1/tasks", headers=headers).status_code == 200
    revoke(headers)

    assert wrong.status_code == 401
    assert api.get("/api/v1/tasks", headers=headers).status_code == 401


def test_a_revoked_key_is_refused_once_the_cache_time_has_passed(
    auth_env: dict[str, str], configure: object
) -> None:
    from app.main import create_app

    configure({**auth_env, "TASKDOCK_API_KEY_CACHE_SECONDS": "1"})  # type: ignore[operator]
    headers = new_key(Scope.READ)
    with TestClient(create_app(), raise_server_exceptions=False) as api:
        assert api.get("/api/v1/tasks", headers=headers).status_code == 200
        revoke(headers)
        # Checked a moment ago, the key is trusted without a lookup: that is the cache's point.
        cached = api.get("/api/v1/tasks", headers=headers).status_code
        time.sleep(1.1)
        refused = api.get("/api/v1/tasks", headers=headers)
        # A new key works at once: nothing negative is remembered.
        fresh = api.get("/api/v1/tasks", headers=new_key(Scope.READ)).status_code

    assert cached == 200
    assert refused.status_code == 401
    assert refused.json()["code"] == "not_authenticated"
    assert fresh == 200


def test_health_metrics_and_docs_need_no_key(api: TestClient) -> None:
    assert api.get("/health/live").status_code == 200
    assert api.get("/health/ready").status_code == 200
    assert api.get("/metrics").status_code == 200
    assert api.get("/openapi.json").status_code == 200


def test_scopes_limit_what_a_key_may_do(api: TestClient) -> None:
    reader, submitter = new_key(Scope.READ), new_key(Scope.SUBMIT)

    refused = api.post("/api/v1/tasks", json=PROCESS, headers=reader)
    accepted = api.post("/api/v1/tasks", json=PROCESS, headers=submitter)
    unreadable = api.get(f"/api/v1/tasks/{accepted.json()['id']}", headers=submitter)

    assert refused.status_code == 403
    assert refused.json() == {
        "code": "missing_scope",
        "message": "this API key lacks the 'submit' scope",
        "scope": "submit",
    }
    assert accepted.status_code == 202
    assert unreadable.status_code == 403


def test_a_key_sees_only_its_own_tasks(api: TestClient) -> None:
    alice = new_key(Scope.SUBMIT, Scope.READ, name="alice")
    bob = new_key(Scope.SUBMIT, Scope.READ, name="bob")
    admin = new_key(Scope.ADMIN, name="ops")
    task = api.post("/api/v1/tasks", json=PROCESS, headers=alice).json()
    bobs = api.post("/api/v1/tasks", json=PROCESS, headers=bob).json()

    for method, path in [
        ("GET", f"/api/v1/tasks/{task['id']}"),
        ("POST", f"/api/v1/tasks/{task['id']}/cancel"),
        ("POST", f"/api/v1/tasks/{task['id']}/retry"),
    ]:
        response = api.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path)
        assert response.json()["code"] == "task_not_found"
    bob_list = [item["id"] for item in api.get("/api/v1/tasks", headers=bob).json()["items"]]
    admin_list = [item["id"] for item in api.get("/api/v1/tasks", headers=admin).json()["items"]]

    assert bob_list == [bobs["id"]]
    assert set(admin_list) == {task["id"], bobs["id"]}
    assert api.get(f"/api/v1/tasks/{task['id']}", headers=alice).status_code == 200
    assert api.post(f"/api/v1/tasks/{task['id']}/cancel", headers=admin).status_code == 200


def test_idempotency_keys_are_per_api_key(api: TestClient) -> None:
    alice, bob = new_key(Scope.SUBMIT), new_key(Scope.SUBMIT)
    same = {"Idempotency-Key": "shared-name"}

    first = api.post("/api/v1/tasks", json=PROCESS, headers={**alice, **same})
    second = api.post("/api/v1/tasks", json=PROCESS, headers={**bob, **same})

    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]


def test_keys_cli_prints_the_key_once_and_stores_a_hash(
    auth_env: dict[str, str], api: TestClient
) -> None:
    api.app.state.key_cache.seconds = 0  # type: ignore[attr-defined]  # see the cache's own test
    created = taskdock(
        "keys", "create", "--name", "billing", "--scopes", "submit,read", env=auth_env
    )
    assert created.returncode == 0, created.stderr
    plain = created.stdout.strip().splitlines()[-1]
    assert plain.startswith("tdk_")

    listed = taskdock("keys", "list", env=auth_env)
    assert "billing" in listed.stdout
    assert plain not in listed.stdout
    database = Path(auth_env["TASKDOCK_DATA_DIR"]) / "taskdock.db"
    assert plain.encode() not in database.read_bytes()
    headers = {"Authorization": f"Bearer {plain}"}
    assert api.post("/api/v1/tasks", json=PROCESS, headers=headers).status_code == 202

    prefix = plain.split("_")[1]
    assert taskdock("keys", "revoke", prefix, env=auth_env).returncode == 0
    assert api.get("/api/v1/tasks", headers=headers).status_code == 401
    assert taskdock("keys", "revoke", "no-such-key", env=auth_env).returncode == 1
    bad = taskdock("keys", "create", "--name", "x", "--scopes", "everything", env=auth_env)
    assert bad.returncode == 2


def test_bootstrap_key_is_registered_by_migrate(auth_env: dict[str, str], api: TestClient) -> None:
    bootstrap = f"bootstrap-{uuid.uuid4()}"
    env = {**auth_env, "TASKDOCK_BOOTSTRAP_API_KEY": bootstrap}

    assert taskdock("migrate", env=env).returncode == 0
    assert taskdock("migrate", env=env).returncode == 0  # idempotent

    headers = {"Authorization": f"Bearer {bootstrap}"}
    assert api.get("/api/v1/tasks", headers=headers).status_code == 200
    assert taskdock("keys", "list", env=auth_env).stdout.count("bootstrap") == 1


def test_auth_off_is_announced(
    tmp_path: Path, configure: object, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.main import create_app

    configure(base_env(tmp_path / "data", TASKDOCK_AUTH_ENABLED="false"))  # type: ignore[operator]
    migrate_now()
    with TestClient(create_app()) as client:
        assert client.get("/api/v1/tasks").status_code == 200

    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert any(
        line["level"] == "warning" and "authentication is OFF" in line["message"] for line in lines
    )
