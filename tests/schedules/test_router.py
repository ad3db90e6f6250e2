"""/api/v1/schedules over HTTP with API keys, on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.auth import service as keys
from app.auth.service import Scope
from app.core.db import session_scope
from tests.conftest import migrate_now
from tests.support import services
from tests.support.stack import base_env

URL = "/api/v1/schedules"
EVERY_5 = {"type": "sleep", "payload": {"seconds": 0}, "interval_seconds": 5}
NIGHTLY = {
    "name": "nightly",
    "type": "process_data",
    "payload": {"user_id": 1, "data": "x"},
    "cron": "0 3 * * *",
    "timezone": "Europe/Berlin",
}


@pytest.fixture(params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path: Path, configure: Any) -> Iterator[TestClient]:
    from app.main import create_app

    def start(**extra: str) -> Iterator[TestClient]:
        configure(base_env(tmp_path / "data", TASKDOCK_AUTH_ENABLED="true", **extra))
        migrate_now()
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            yield client

    if request.param == "sqlite":
        yield from start()
        return
    with services.scratch_database() as url:
        yield from start(TASKDOCK_DATABASE_URL=url)


def key(*scopes: Scope) -> dict[str, str]:
    with session_scope() as session:
        _, plain = keys.create(
            session=session, name="k", scopes=list(scopes) or [Scope.SUBMIT, Scope.READ]
        )
    return {"Authorization": f"Bearer {plain}"}


def test_create_read_list_change_pause_resume_delete(api: TestClient) -> None:
    owner = key()
    created = api.post(URL, json=NIGHTLY, headers=owner)
    assert created.status_code == 201, created.text
    body = created.json()
    assert created.headers["location"] == f"{URL}/{body['id']}"
    assert body["cron"] == "0 3 * * *"
    assert body["timezone"] == "Europe/Berlin"
    assert body["interval_seconds"] is None
    assert body["source"] == "api"
    assert body["overlap"] == "allow"
    assert body["catchup"] == "latest"
    assert not body["paused"]
    # 03:00 in Berlin is 01:00 or 02:00 UTC, whatever the season.
    assert body["next_fire_at"][11:19] in {"01:00:00", "02:00:00"}
    one = f"{URL}/{body['id']}"
    assert api.get(one, headers=owner).json() == body
    assert [item["id"] for item in api.get(URL, headers=owner).json()["items"]] == [body["id"]]

    switched = api.patch(
        one, json={"cron": None, "interval_seconds": 60, "priority": 3}, headers=owner
    )
    assert switched.status_code == 200, switched.text
    changed = switched.json()
    assert (changed["cron"], changed["interval_seconds"], changed["priority"]) == (None, 60, 3)
    assert changed["payload"] == NIGHTLY["payload"]
    assert changed["name"] == "nightly"

    paused = api.post(f"{one}/pause", headers=owner).json()
    assert paused["paused"] is True
    resumed = api.post(f"{one}/resume", headers=owner).json()
    assert resumed["paused"] is False
    assert resumed["next_fire_at"] >= paused["next_fire_at"]

    assert api.delete(one, headers=owner).status_code == 204
    assert api.get(one, headers=owner).status_code == 404
    assert api.get(one, headers=owner).json()["code"] == "schedule_not_found"


def test_another_keys_schedule_is_not_found(api: TestClient) -> None:
    alice, bob, admin = key(), key(), key(Scope.ADMIN)
    mine = api.post(URL, json=EVERY_5, headers=alice).json()
    one = f"{URL}/{mine['id']}"
    for method, path, body in [
        ("GET", one, None),
        ("PATCH", one, {"priority": 1}),
        ("POST", f"{one}/pause", None),
        ("POST", f"{one}/resume", None),
        ("DELETE", one, None),
    ]:
        response = api.request(method, path, json=body, headers=bob)
        assert response.status_code == 404, (method, path, response.text)
    assert api.get(URL, headers=bob).json()["items"] == []
    assert api.get(one, headers=alice).json()["priority"] == 0
    # An admin key acts across owners, as with tasks.
    assert [item["id"] for item in api.get(URL, headers=admin).json()["items"]] == [mine["id"]]


def test_a_read_only_key_cannot_create(api: TestClient) -> None:
    reader = key(Scope.READ)
    assert api.post(URL, json=EVERY_5, headers=reader).status_code == 403
    assert api.post(URL, json=EVERY_5).status_code == 401


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"cron": "0 3 * *"}, ["body", "cron"]),
        ({"cron": "99 * * * *"}, ["body", "cron"]),
        ({"timezone": "Mars/Olympus"}, ["body", "timezone"]),
        ({"interval_seconds": 5}, ["body", "interval_seconds"]),  # both
        ({"cron": None}, ["body", "cron"]),  # neither
        ({"interval_seconds": 0, "cron": None}, ["body", "interval_seconds"]),
        ({"type": "no.such.type"}, ["body", "type"]),
        ({"payload": {"user_id": "x", "data": "y"}}, ["body", "payload", "user_id"]),
        ({"payload": {"data": "y"}}, ["body", "payload", "user_id"]),
        ({"queue": "nobody-listens"}, ["body", "queue"]),
        ({"overlap": "sometimes"}, ["body", "overlap"]),
        ({"catchup": "never"}, ["body", "catchup"]),
        ({"catchup_window_seconds": 0}, ["body", "catchup_window_seconds"]),
        ({"status": "RUNNING"}, ["body", "status"]),
        ({"paused": 0.0}, ["body", "paused"]),  # the schema says boolean: no lax 0 → false
        ({"paused": "yes"}, ["body", "paused"]),
    ],
)
def test_bad_definitions_are_422_naming_the_field(
    api: TestClient, change: dict[str, Any], field: list[str]
) -> None:
    owner = key()
    response = api.post(URL, json={**NIGHTLY, **change}, headers=owner)
    assert response.status_code == 422, response.text
    assert field in [error["loc"] for error in response.json()["fields"]], response.text
    assert api.get(URL, headers=owner).json()["items"] == []


def test_bad_changes_are_422_and_change_nothing(api: TestClient) -> None:
    owner = key()
    created = api.post(URL, json=NIGHTLY, headers=owner).json()
    one = f"{URL}/{created['id']}"
    for change, field in [
        ({"interval_seconds": 10}, ["body", "cron"]),  # both
        ({"cron": None}, ["body", "cron"]),  # neither
        ({"payload": {"user_id": -1, "data": "x"}}, ["body", "payload", "user_id"]),
        ({"type": "sleep"}, ["body", "payload", "seconds"]),  # the payload no longer fits
        ({"timezone": None}, ["body", "timezone"]),
        ({"paused": 0.0}, ["body", "paused"]),  # found by the fuzzer: it was taken as false
        ({"paused": "true"}, ["body", "paused"]),
    ]:
        response = api.patch(one, json=change, headers=owner)
        assert response.status_code == 422, (change, response.text)
        assert field in [error["loc"] for error in response.json()["fields"]], response.text
    assert api.get(one, headers=owner).json() == created


def test_names_are_unique_per_key(api: TestClient) -> None:
    alice, bob = key(), key()
    assert api.post(URL, json=NIGHTLY, headers=alice).status_code == 201
    again = api.post(URL, json=NIGHTLY, headers=alice)
    assert again.status_code == 409
    assert again.json()["code"] == "schedule_name_taken"
    assert api.post(URL, json=NIGHTLY, headers=bob).status_code == 201


def test_unknown_ids_are_404(api: TestClient) -> None:
    assert api.get(f"{URL}/{uuid.uuid4()}", headers=key()).status_code == 404
    assert api.get(f"{URL}/not-a-uuid", headers=key()).status_code == 422
