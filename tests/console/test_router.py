"""The console over HTTP: sessions, CSRF, scopes, owners, escaping, filters and pages."""

from __future__ import annotations

import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.console.conftest import Keys, hidden, login
from tests.support.stack import base_env

HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>"


def api_submit(client: TestClient, key: str, payload: dict[str, object], **extra: object) -> str:
    answer = client.post(
        "/api/v1/tasks",
        json={"type": "sleep", "payload": payload, **extra},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def test_pages_need_a_login_and_a_wrong_key_gets_none(app_client: TestClient, keys: Keys) -> None:
    for path in (
        "/console",
        "/console/tasks",
        "/console/types",
        "/console/live/overview",
        "/console/events",
        "/console/bulk",
        "/console/schedules",
    ):
        answer = app_client.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/console/login"
    page = app_client.get("/console/login")
    answer = app_client.post(
        "/console/login", data={"token": hidden(page.text, "token"), "api_key": "tdk_nope"}
    )
    assert answer.status_code == 401
    assert "unknown or revoked" in answer.text
    assert "taskdock_console=" not in answer.headers.get("set-cookie", "")


def test_login_gives_a_strict_httponly_cookie_holding_no_key(
    app_client: TestClient, keys: Keys
) -> None:
    page = app_client.get("/console/login")
    answer = app_client.post(
        "/console/login", data={"token": hidden(page.text, "token"), "api_key": keys.alice}
    )
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith("taskdock_console=")
    )
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/console" in cookie
    assert "Max-Age=" in cookie
    assert keys.alice not in cookie
    assert keys.alice.split("_", 2)[2] not in cookie  # the secret (it may hold "_")
    assert app_client.get("/console").status_code == 200


def test_login_without_its_form_token_is_refused(app_client: TestClient, keys: Keys) -> None:
    answer = app_client.post("/console/login", data={"api_key": keys.alice})
    assert answer.status_code == 403
    assert app_client.get("/console").status_code == 303


def test_every_answer_carries_a_strict_csp(app_client: TestClient, keys: Keys) -> None:
    login(app_client, keys.alice)
    for path in ("/console", "/console/tasks", "/console/login", "/console/static/console.js"):
        headers = app_client.get(path).headers
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["x-content-type-options"] == "nosniff"
    page = app_client.get("/console/submit?type=sleep").text
    assert "<script>" not in page
    assert " style=" not in page
    assert "onclick" not in page


def test_a_post_without_the_csrf_token_is_refused(app_client: TestClient, keys: Keys) -> None:
    csrf = login(app_client, keys.alice)
    task_id = api_submit(app_client, keys.alice, {"seconds": 30}, countdown=600)
    for data in ({}, {"csrf": "forged"}):
        answer = app_client.post(f"/console/tasks/{task_id}/cancel", data=data)
        assert answer.status_code == 403
        assert "CSRF" in answer.text
        submitted = app_client.post(
            "/console/submit", data={**data, "type": "sleep", "payload.seconds": "1"}
        )
        assert submitted.status_code == 403
    assert "QUEUED" in app_client.get(f"/console/live/tasks/{task_id}").text
    # The session's own token is accepted.
    answer = app_client.post(f"/console/tasks/{task_id}/cancel", data={"csrf": csrf})
    assert answer.status_code == 303
    assert app_client.get(f"/console/live/tasks/{task_id}").json()["status"] == "CANCELLED"


def test_another_keys_task_is_404_and_unlisted(app_client: TestClient, keys: Keys) -> None:
    theirs = api_submit(app_client, keys.bob, {"seconds": 1}, countdown=600)
    csrf = login(app_client, keys.alice)
    assert app_client.get(f"/console/tasks/{theirs}").status_code == 404
    assert app_client.get(f"/console/live/tasks/{theirs}").status_code == 404
    assert app_client.post(f"/console/tasks/{theirs}/cancel", data={"csrf": csrf}).status_code == (
        404
    )
    assert theirs not in app_client.get("/console/tasks").text
    # An admin key sees every owner's tasks, as on the API.
    app_client.cookies.clear()
    login(app_client, keys.admin)
    assert app_client.get(f"/console/tasks/{theirs}").status_code == 200


def test_a_read_only_key_cannot_act(app_client: TestClient, keys: Keys) -> None:
    task_id = api_submit(app_client, keys.alice, {"seconds": 1})
    csrf = login(app_client, keys.reader)
    answer = app_client.post(
        "/console/submit", data={"csrf": csrf, "type": "sleep", "payload.seconds": "1"}
    )
    assert answer.status_code == 403
    assert "submit" in answer.text
    assert app_client.get("/console/tasks").status_code == 200
    assert app_client.get(f"/console/tasks/{task_id}").status_code == 404


def test_a_revoked_key_ends_its_session(app_client: TestClient, keys: Keys) -> None:
    from app.auth import service
    from app.core.db import session_scope

    login(app_client, keys.alice)
    assert app_client.get("/console").status_code == 200
    with session_scope() as session:
        service.revoke(session=session, key=keys.alice.split("_")[1])
    # The key cache is off in these tests (TASKDOCK_API_KEY_CACHE_SECONDS=0).
    assert app_client.get("/console").status_code == 303
    assert app_client.get("/console/live/overview").status_code == 303


def test_logout_ends_the_session(app_client: TestClient, keys: Keys) -> None:
    csrf = login(app_client, keys.alice)
    answer = app_client.post("/console/logout", data={"csrf": csrf})
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/login"
    assert app_client.get("/console").status_code == 303


def test_submit_shows_the_types_errors_at_the_field(app_client: TestClient, keys: Keys) -> None:
    csrf = login(app_client, keys.alice)
    form = app_client.get("/console/submit?type=sleep").text
    assert 'name="payload.seconds"' in form
    assert 'name="payload.fail"' in form
    answer = app_client.post(
        "/console/submit",
        data={"csrf": csrf, "type": "sleep", "payload.seconds": "900", "priority": "3"},
    )
    assert answer.status_code == 422
    error = re.search(r'id="error-seconds">([^<]*)<', answer.text)
    assert error
    assert "less than or equal to 300" in error.group(1)
    assert 'value="900"' in answer.text  # the form keeps what was typed
    answer = app_client.post(
        "/console/submit",
        data={"csrf": csrf, "type": "sleep", "payload.seconds": "0", "priority": "12"},
    )
    assert answer.status_code == 422
    assert 'id="error-priority"' in answer.text
    answer = app_client.post(
        "/console/submit",
        data={"csrf": csrf, "type": "sleep", "payload.seconds": "2.5", "priority": "4"},
    )
    assert answer.status_code == 303
    task = app_client.get(
        "/api/v1/tasks/" + answer.headers["location"].rsplit("/", 1)[1],
        headers={"Authorization": f"Bearer {keys.alice}"},
    ).json()
    assert task["payload"] == {"seconds": 2.5, "fail": False}
    assert task["priority"] == 4


def test_user_supplied_text_is_shown_escaped(app_client: TestClient, keys: Keys) -> None:
    # In a payload (process_data keeps its text) and in the idempotency key.
    hostile = HOSTILE
    answer = app_client.post(
        "/api/v1/tasks",
        json={"type": "process_data", "payload": {"user_id": 1, "data": hostile}},
        headers={"Authorization": f"Bearer {keys.alice}", "Idempotency-Key": hostile},
    )
    assert answer.status_code == 202, answer.text
    task_id = answer.json()["id"]
    login(app_client, keys.alice)
    for path in (f"/console/tasks/{task_id}", "/console/tasks"):
        page = app_client.get(path).text
        assert hostile not in page
        assert html.escape(hostile, quote=True) in page or html.escape(hostile) in page


def test_list_filters_count_and_pages(app_client: TestClient, keys: Keys) -> None:
    for number in range(60):
        api_submit(app_client, keys.alice, {"seconds": number % 3}, countdown=600)
    api_submit(app_client, keys.bob, {"seconds": 1}, countdown=600)
    login(app_client, keys.alice)
    first = app_client.get("/console/tasks")
    assert first.text.count("data-task=") == 50
    assert 'id="count"' in first.text
    assert re.search(r'id="count" data-live-key="count">60<', first.text)
    next_url = html.unescape(re.search(r'href="([^"]+)" id="next-page"', first.text).group(1))  # type: ignore[union-attr]
    second = app_client.get(next_url)
    assert second.text.count("data-task=") == 10
    assert 'id="next-page"' not in second.text
    ids = set(re.findall(r'data-task="([^"]+)"', first.text + second.text))
    assert len(ids) == 60
    only_two = app_client.get("/console/tasks", params={"contains": '{"seconds": 2}'})
    assert only_two.text.count("data-task=") == 20
    assert app_client.get("/console/tasks", params={"contains": "[1]"}).status_code == 422
    assert app_client.get("/console/tasks", params={"contains": "{"}).status_code == 422
    queued = app_client.get("/console/tasks", params={"status": "QUEUED", "type": "sleep"})
    assert queued.text.count("data-task=") == 50
    none = app_client.get("/console/tasks", params={"status": "FAILED"})
    assert none.text.count("data-task=") == 0
    assert app_client.get("/console/tasks", params={"status": "NOPE"}).status_code == 422
    future = app_client.get("/console/tasks", params={"from": "2999-01-01T00:00:00"})
    assert future.text.count("data-task=") == 0
    live = app_client.get("/console/live/tasks", params={"status": "QUEUED"}).json()
    assert live["count"] == "60"
    rows = live["tables"]["task-list"]
    assert len(rows) == 50
    # Cells in the page's column order: task, type, status, ...
    assert {row["cells"][2]["status"] for row in rows} == {"QUEUED"}
    assert {row["data"]["task"] for row in rows} <= ids


def test_counts_stop_at_their_bound(
    app_client: TestClient, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.console import queries

    # The bounds are 1,000 and 10,000; seven tasks over a bound of five show the same logic.
    monkeypatch.setattr(queries, "COUNT_LIMIT", 5)
    monkeypatch.setattr(queries, "STATUS_COUNT_LIMIT", 5)
    for _ in range(7):
        api_submit(app_client, keys.alice, {"seconds": 1}, countdown=600)
    login(app_client, keys.alice)
    assert re.search(
        r'id="count" data-live-key="count">5\+<', app_client.get("/console/tasks").text
    )
    live = app_client.get("/console/live/overview").json()
    assert live["status:QUEUED"] == "5+"
    assert live["status:FAILED"] == "0"


def test_overview_and_chart(app_client: TestClient, keys: Keys) -> None:
    api_submit(app_client, keys.alice, {"seconds": 1}, countdown=600)
    login(app_client, keys.alice)
    page = app_client.get("/console").text
    for text in ("QUEUED", "Queues", "Workers alive", "Outbox backlog", "Dispatcher"):
        assert text in page
    live = app_client.get("/console/live/overview").json()
    assert live["status:QUEUED"] == "1"
    assert "queue:default:waiting" in live
    chart = app_client.get("/console/chart.svg")
    assert chart.headers["content-type"].startswith("image/svg+xml")
    assert chart.text.startswith("<svg")
    assert "0 succeeded, 0 failed" in chart.text
    from sqlalchemy import update

    from app.core.db import session_scope
    from app.db.base import utcnow
    from app.tasks.models import Task
    from app.tasks.states import TaskStatus

    with session_scope() as session:
        session.execute(update(Task).values(status=TaskStatus.FAILED, finished_at=utcnow()))
    assert "0 succeeded, 1 failed" in app_client.get("/console/chart.svg").text
    # Another owner's finished task is not in alice's chart.
    api_submit(app_client, keys.bob, {"seconds": 1}, countdown=600)
    with session_scope() as session:
        session.execute(
            update(Task)
            .where(Task.status == TaskStatus.QUEUED)
            .values(status=TaskStatus.SUCCEEDED, finished_at=utcnow())
        )
    assert "0 succeeded, 1 failed" in app_client.get("/console/chart.svg").text


def test_the_chart_keeps_closed_minutes_and_reads_only_the_new_ones(
    app_client: TestClient, keys: Keys
) -> None:
    import uuid
    from datetime import timedelta

    from sqlalchemy import update

    from app.console import queries
    from app.core.db import session_scope
    from app.db.base import utcnow
    from app.tasks.models import Task
    from app.tasks.states import TaskStatus

    def finished(status: TaskStatus, minutes_ago: int) -> None:
        task_id = api_submit(app_client, keys.alice, {"seconds": 1}, countdown=600)
        with session_scope() as session:
            session.execute(
                update(Task)
                .where(Task.id == uuid.UUID(task_id))
                .values(status=status, finished_at=utcnow() - timedelta(minutes=minutes_ago))
            )

    def charts(kept: queries.ChartMinutes) -> tuple[list[tuple[int, int]], ...]:
        with session_scope() as session:
            return (
                queries.chart(session=session, owner=None, kept=kept),
                queries.chart(session=session, owner=None),
            )

    def totals(series: list[tuple[int, int]]) -> tuple[int, int]:
        return sum(ok for ok, _ in series), sum(failed for _, failed in series)

    kept = queries.ChartMinutes()
    finished(TaskStatus.SUCCEEDED, 30)
    finished(TaskStatus.FAILED, 0)
    first, plain = charts(kept)
    assert first == plain
    assert totals(first) == (1, 1)
    # A finish in the current minute shows at once.
    finished(TaskStatus.FAILED, 0)
    again, plain = charts(kept)
    assert again == plain
    assert totals(again) == (1, 2)
    # A closed minute is read once: a row written into it afterwards is not read again (no
    # outcome is written with a time minutes in the past; this shows what each chart reads).
    finished(TaskStatus.SUCCEEDED, 20)
    later, plain = charts(kept)
    assert totals(plain) == (2, 2)
    assert totals(later) == (1, 2)
    # Each owner has its own.
    with session_scope() as session:
        theirs = queries.chart(session=session, owner="someone-else", kept=kept)
    assert totals(theirs) == (0, 0)


def test_types_page_shows_schemas_and_policies(app_client: TestClient, keys: Keys) -> None:
    login(app_client, keys.reader)
    page = app_client.get("/console/types").text
    assert 'id="type-sleep"' in page
    assert "Max attempts" in page
    assert html.escape('"seconds"', quote=False) in page or "&#34;seconds&#34;" in page


def test_auth_off_needs_no_login_and_sqlite_refuses_containment(
    embedded_client: TestClient,
) -> None:
    page = embedded_client.get("/console/tasks")
    assert page.status_code == 200
    assert "Log out" not in page.text
    csrf = hidden(page.text, "csrf") if 'name="csrf"' in page.text else None
    assert csrf is None  # the list page has no form that posts
    form = embedded_client.get("/console/submit?type=sleep")
    csrf = hidden(form.text, "csrf")
    answer = embedded_client.post(
        "/console/submit",
        data={"csrf": csrf, "type": "sleep", "payload.seconds": "0"},
        follow_redirects=False,
    )
    assert answer.status_code == 303
    assert (
        embedded_client.post(
            "/console/submit",
            data={"type": "sleep", "payload.seconds": "0"},
            follow_redirects=False,
        ).status_code
        == 403
    )
    for path in ("/console", "/console/live/overview", "/console/chart.svg", "/console/types"):
        assert embedded_client.get(path).status_code == 200, path
    # The chart's per-minute buckets on SQLite's text timestamps.
    from sqlalchemy import update

    from app.core.db import session_scope
    from app.db.base import utcnow
    from app.tasks.models import Task
    from app.tasks.states import TaskStatus

    with session_scope() as session:
        session.execute(
            update(Task).values(status=TaskStatus.SUCCEEDED, finished_at=utcnow(), attempt=1)
        )
    assert "1 succeeded, 0 failed" in embedded_client.get("/console/chart.svg").text
    refused = embedded_client.get("/console/tasks", params={"contains": '{"seconds": 0}'})
    assert refused.status_code == 422
    assert "PostgreSQL" in refused.text


def test_an_api_process_builds_the_console_on_its_first_page(embedded_env: dict[str, str]) -> None:
    # Most API processes never serve a page: the console's routes and templates are built on
    # the first request for one (app/console/mount.py), and then served as if always there.
    code = """
import sys
from fastapi.testclient import TestClient
from app.main import create_app
app = create_app()
loaded = lambda: "app.console.router" in sys.modules or "jinja2" in sys.modules
with TestClient(app) as client:
    print("at start:", loaded(), client.get("/health/live").status_code, loaded())
    first = client.get("/console")
    print("first page:", first.status_code, "content-security-policy" in first.headers, loaded())
    print("again:", client.get("/console").status_code, client.get("/console/x").status_code)
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=base_env(Path(embedded_env["TASKDOCK_DATA_DIR"])) | embedded_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if not line.startswith("{")]
    assert lines == [
        "at start: False 200 False",
        "first page: 200 True True",
        "again: 200 404",
    ], done.stdout[-3000:]
