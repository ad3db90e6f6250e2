"""A console on PostgreSQL with auth on, and keys of two owners."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.conftest import migrate_now
from tests.support import services
from tests.support.stack import base_env


@dataclass(frozen=True)
class Keys:
    admin: str
    alice: str
    bob: str
    reader: str


def make_key(name: str, scopes: list[str]) -> str:
    from app.auth import service
    from app.auth.service import Scope
    from app.core.db import session_scope

    with session_scope() as session:
        _, plain = service.create(
            session=session, name=name, scopes=[Scope(scope) for scope in scopes]
        )
    return plain


@pytest.fixture
def console_env(tmp_path: Path, configure: object) -> Iterator[dict[str, str]]:
    with services.scratch_database() as url:
        env = base_env(
            tmp_path / "data",
            TASKDOCK_DATABASE_URL=url,
            TASKDOCK_AUTH_ENABLED="true",
            TASKDOCK_API_KEY_CACHE_SECONDS="0",
        )
        configure(env)  # type: ignore[operator]
        migrate_now()
        yield env


@pytest.fixture
def keys(console_env: dict[str, str]) -> Keys:
    return Keys(
        admin=make_key("admin", ["admin"]),
        alice=make_key("alice", ["submit", "read"]),
        bob=make_key("bob", ["submit", "read"]),
        reader=make_key("reader", ["read"]),
    )


@pytest.fixture
def app_client(console_env: dict[str, str]) -> Iterator[TestClient]:
    from app.main import create_app

    with TestClient(
        create_app(), raise_server_exceptions=False, follow_redirects=False
    ) as test_client:
        yield test_client


def hidden(html: str, name: str) -> str:
    """The value of the page's hidden input `name`."""
    match = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert match, f"no hidden {name} in the page"
    return match.group(1)


def login(client: TestClient, key: str) -> str:
    """Log in through the form; returns the session's CSRF token."""
    page = client.get("/console/login")
    assert page.status_code == 200
    answer = client.post(
        "/console/login", data={"token": hidden(page.text, "token"), "api_key": key}
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == "/console"
    return hidden(client.get("/console/tasks").text, "csrf")
