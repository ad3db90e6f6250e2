"""The SSRF guard at submit: loopback, private, link-local and metadata addresses are refused
(422 naming notify_url) unless TASKDOCK_WEBHOOK_ALLOWED_NETWORKS allows the network."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core.config import Settings
from tests.conftest import migrate_now
from tests.support.stack import base_env

PROCESS = {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}


def client_with(tmp_path: Path, configure: object, **env: str) -> TestClient:
    configure(base_env(tmp_path / "data", **env))  # type: ignore[operator]
    migrate_now()
    from app.main import create_app

    return TestClient(create_app(), raise_server_exceptions=False)


@pytest.fixture
def guarded(tmp_path: Path, configure: object) -> Iterator[TestClient]:
    with client_with(tmp_path, configure) as client:
        yield client


@pytest.fixture
def loopback_allowed(tmp_path: Path, configure: object) -> Iterator[TestClient]:
    env = {"TASKDOCK_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}
    with client_with(tmp_path, configure, **env) as client:
        yield client


def submit(client: TestClient, url: str) -> tuple[int, dict[str, object]]:
    response = client.post("/api/v1/tasks", json={**PROCESS, "notify_url": url})
    return response.status_code, response.json()


def refused_field(body: dict[str, object]) -> str:
    fields = body["fields"]
    assert isinstance(fields, list), body
    assert fields, body
    assert fields[0]["loc"] == ["body", "notify_url"], body
    return str(fields[0]["msg"])


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is not a public address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address"),
        ("http://10.1.2.3/hook", "10.1.2.3 is not a public address"),
        ("http://[::1]/hook", "::1 is not a public address"),
        ("http://[::ffff:127.0.0.1]/hook", "127.0.0.1 is not a public address"),
        ("http://localhost:8080/hook", "localhost resolves to 127.0.0.1, not a public"),
        ("ftp://example.com/hook", "http or https"),
        ("http:///hook", "no host"),
        ("http://user:secret@example.com/hook", "credentials"),
    ],
)
def test_a_notify_url_to_a_private_address_is_refused_at_submit(
    guarded: TestClient, url: str, why: str
) -> None:
    status, body = submit(guarded, url)
    assert status == 422, body
    assert why in refused_field(body)
    # Nothing was recorded.
    assert guarded.get("/api/v1/tasks").json()["items"] == []


def test_an_allowed_network_may_be_notified_and_the_metadata_address_still_not(
    loopback_allowed: TestClient,
) -> None:
    status, body = submit(loopback_allowed, "http://127.0.0.1:8080/hook")
    assert status == 202, body
    assert body["notify_url"] == "http://127.0.0.1:8080/hook"
    read = loopback_allowed.get(f"/api/v1/tasks/{body['id']}").json()
    assert read["notify_url"] == "http://127.0.0.1:8080/hook"

    status, body = submit(loopback_allowed, "http://169.254.169.254/latest/meta-data/")
    assert status == 422
    assert "169.254.169.254 is not a public address" in refused_field(body)


def test_a_submission_without_notify_url_keeps_its_idempotency_hash() -> None:
    from app.tasks.schemas import TaskCreate
    from app.tasks.service import request_hash

    without = TaskCreate.model_validate(PROCESS)
    with_url = TaskCreate.model_validate({**PROCESS, "notify_url": "https://example.com/h"})
    # The hash of a body without the new field is what it was before the field existed.
    before = {
        "type": "process_data",
        "payload": {"user_id": 1, "data": "x"},
        "queue": None,
        "priority": 0,
        "countdown": None,
        "eta": None,
    }
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    assert request_hash(without) == hashlib.sha256(canonical).hexdigest()
    assert request_hash(with_url) != request_hash(without)


def test_webhook_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="not a network"):
        Settings(webhook_allowed_networks="10.0.0.0/8,nonsense")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not a webhook secret"):
        Settings(webhook_anonymous_secret="whsec_c2hvcnQ=")  # type: ignore[arg-type]
    assert Settings(webhook_allowed_networks="127.0.0.0/8").webhook_allowed_networks == [
        "127.0.0.0/8"
    ]


def test_production_without_a_webhook_secret_refuses_notify_urls() -> None:
    from app.core.config import Environment
    from app.webhooks import signing

    production = Settings(
        environment=Environment.PRODUCTION,
        database_url="postgresql://x@db/x",
        broker_url="redis://r:6379/0",
    )
    assert not signing.enabled(production)
    with pytest.raises(signing.WebhooksOff):
        signing.secret_for(owner="k", settings=production)
    keyed = Settings(
        environment=Environment.PRODUCTION,
        database_url="postgresql://x@db/x",
        broker_url="redis://r:6379/0",
        webhook_secret="s3cret",  # type: ignore[arg-type]
    )
    one, other = (signing.secret_for(owner=o, settings=keyed) for o in ("a", "b"))
    assert one.startswith("whsec_")
    assert one != other
    assert signing.secret_for(owner="a", settings=keyed) == one


SCHEDULE = {**PROCESS, "interval_seconds": 60}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address"),
        ("http://127.0.0.1:8080/hook", "127.0.0.1 is not a public address"),
        ("ftp://example.com/hook", "http or https"),
    ],
)
def test_a_schedules_notify_url_passes_the_same_guard(
    guarded: TestClient, url: str, why: str
) -> None:
    created = guarded.post("/api/v1/schedules", json={**SCHEDULE, "notify_url": url})
    assert created.status_code == 422, created.text
    assert why in refused_field(created.json())
    assert guarded.get("/api/v1/schedules").json()["items"] == []

    made = guarded.post("/api/v1/schedules", json=SCHEDULE)
    assert made.status_code == 201, made.text
    one = f"/api/v1/schedules/{made.json()['id']}"
    changed = guarded.patch(one, json={"notify_url": url})
    assert changed.status_code == 422, changed.text
    assert why in refused_field(changed.json())
    assert guarded.get(one).json()["notify_url"] is None


def test_a_schedule_may_notify_an_allowed_network(loopback_allowed: TestClient) -> None:
    url = "http://127.0.0.1:8080/hook"
    created = loopback_allowed.post("/api/v1/schedules", json={**SCHEDULE, "notify_url": url})
    assert created.status_code == 201, created.text
    assert created.json()["notify_url"] == url
