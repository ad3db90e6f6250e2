"""The console's bulk and schedules pages over HTTP: counts before changes, CSRF, scopes,
owners, and errors at their fields."""

from __future__ import annotations

import html
import re

from fastapi.testclient import TestClient
from markupsafe import escape

from tests.console.conftest import Keys, login
from tests.console.test_router import HOSTILE, api_submit


def api(client: TestClient, key: str, method: str, path: str, **json: object) -> object:
    answer = client.request(
        method, path, json=json or None, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code < 300, answer.text
    return answer.json()


def matched(page: str) -> int:
    found = re.search(r'<strong id="matched">(\d+)</strong>', page)
    assert found, page
    return int(found.group(1))


def statuses(client: TestClient, key: str, ids: list[str]) -> set[str]:
    return {
        str(api(client, key, "GET", f"/api/v1/tasks/{tid}")["status"])  # type: ignore[index]
        for tid in ids
    }


def test_bulk_cancel_counts_then_changes_only_after_the_confirmation(
    app_client: TestClient, keys: Keys
) -> None:
    mine = [api_submit(app_client, keys.alice, {"seconds": 1}, countdown=600) for _ in range(7)]
    theirs = [api_submit(app_client, keys.bob, {"seconds": 1}, countdown=600) for _ in range(3)]
    csrf = login(app_client, keys.alice)
    # From the task list's filter to the bulk page, with that filter.
    listing = app_client.get("/console/tasks", params={"status": "QUEUED", "type": "sleep"})
    link = re.search(r'href="(/console/bulk\?[^"]*)" id="bulk-link"', listing.text)
    assert link, listing.text
    bulk_url = html.unescape(link.group(1))
    assert "status=QUEUED" in bulk_url
    assert "type=sleep" in bulk_url

    counted = app_client.get(bulk_url + "&action=cancel&limit=5")
    assert counted.status_code == 200, counted.text
    assert matched(counted.text) == 5  # the limit: "more may match"
    assert "more may match" in counted.text
    counted = app_client.get(bulk_url + "&action=cancel&limit=100")
    assert matched(counted.text) == 7  # bob's tasks are not alice's to count
    assert statuses(app_client, keys.alice, mine) == {"QUEUED"}  # a count changes nothing

    form = {"action": "cancel", "status": "QUEUED", "type": "sleep", "limit": "100"}
    refused = app_client.post("/console/bulk", data=form)
    assert refused.status_code == 403
    assert statuses(app_client, keys.alice, mine) == {"QUEUED"}

    done = app_client.post("/console/bulk", data={**form, "csrf": csrf})
    assert done.status_code == 303
    after = app_client.get(done.headers["location"])
    assert "Cancelled 7 tasks." in after.text
    assert matched(after.text) == 0
    assert 'id="confirm"' not in after.text
    assert statuses(app_client, keys.alice, mine) == {"CANCELLED"}
    assert statuses(app_client, keys.bob, theirs) == {"QUEUED"}

    # Then retried, by the same page: the cancelled tasks go back to the queue.
    form = {"action": "retry", "status": "CANCELLED", "type": "sleep", "limit": "100"}
    assert matched(app_client.get("/console/bulk", params=form).text) == 7
    assert app_client.post("/console/bulk", data={**form, "csrf": csrf}).status_code == 303
    assert statuses(app_client, keys.alice, mine) == {"QUEUED"}


def test_bulk_refuses_what_the_api_refuses_and_a_reader_may_only_count(
    app_client: TestClient, keys: Keys
) -> None:
    csrf = login(app_client, keys.alice)
    # A status the action never takes, and a limit out of range, are named.
    wrong = app_client.get("/console/bulk", params={"action": "retry", "status": "QUEUED"})
    assert wrong.status_code == 422
    assert "this action takes only tasks in CANCELLED, FAILED, not QUEUED" in wrong.text
    too_many = app_client.get(
        "/console/bulk", params={"action": "cancel", "type": "sleep", "limit": "100001"}
    )
    assert too_many.status_code == 422
    assert "limit:" in too_many.text
    posted = app_client.post(
        "/console/bulk", data={"action": "cancel", "queue": "no such!", "csrf": csrf}
    )
    assert posted.status_code == 422
    assert "queue:" in posted.text

    app_client.cookies.clear()
    reader_csrf = login(app_client, keys.reader)
    counted = app_client.get("/console/bulk", params={"action": "cancel", "type": "sleep"})
    assert counted.status_code == 200
    assert 'id="confirm"' not in counted.text
    denied = app_client.post(
        "/console/bulk", data={"action": "cancel", "type": "sleep", "csrf": reader_csrf}
    )
    assert denied.status_code == 403


def test_schedules_create_pause_resume_delete(app_client: TestClient, keys: Keys) -> None:
    csrf = login(app_client, keys.alice)
    form = {
        "csrf": csrf,
        "name": "every-minute",
        "type": "sleep",
        "payload": '{"seconds": 0}',
        "cron": "* * * * *",
        "timezone": "Europe/Berlin",
        "priority": "3",
        "overlap": "skip",
        "catchup": "latest",
        "catchup_window_seconds": "3600",
    }
    made = app_client.post("/console/schedules", data=form)
    assert made.status_code == 303, made.text
    made = api(app_client, keys.alice, "GET", "/api/v1/schedules")["items"]  # type: ignore[index]
    assert [(s["name"], s["cron"], s["timezone"], s["priority"], s["overlap"]) for s in made] == [
        ("every-minute", "* * * * *", "Europe/Berlin", 3, "skip")
    ]
    sid = made[0]["id"]
    page = app_client.get("/console/schedules").text
    assert f'data-schedule="{sid}" data-paused="no"' in page

    assert app_client.post(f"/console/schedules/{sid}/pause", data={}).status_code == 403
    assert app_client.post(f"/console/schedules/{sid}/pause", data={"csrf": csrf}).is_redirect
    assert api(app_client, keys.alice, "GET", f"/api/v1/schedules/{sid}")["paused"] is True  # type: ignore[index]
    assert f'data-schedule="{sid}" data-paused="yes"' in app_client.get("/console/schedules").text
    assert app_client.post(f"/console/schedules/{sid}/resume", data={"csrf": csrf}).is_redirect
    assert api(app_client, keys.alice, "GET", f"/api/v1/schedules/{sid}")["paused"] is False  # type: ignore[index]

    # Another key sees none of it and can change none of it.
    app_client.cookies.clear()
    bob_csrf = login(app_client, keys.bob)
    assert sid not in app_client.get("/console/schedules").text
    for action in ("pause", "delete"):
        answer = app_client.post(f"/console/schedules/{sid}/{action}", data={"csrf": bob_csrf})
        assert answer.status_code == 404
    app_client.cookies.clear()
    csrf = login(app_client, keys.alice)
    assert app_client.post(f"/console/schedules/{sid}/delete", data={"csrf": csrf}).is_redirect
    assert api(app_client, keys.alice, "GET", "/api/v1/schedules")["items"] == []  # type: ignore[index]


def test_a_refused_schedule_shows_each_error_at_its_field_and_keeps_the_form(
    app_client: TestClient, keys: Keys
) -> None:
    csrf = login(app_client, keys.alice)
    base = {"csrf": csrf, "type": "process_data", "timezone": "UTC", "interval_seconds": "60"}
    for change, field, why in [
        ({"cron": "61 * * * *"}, "cron", "invalid cron expression"),
        ({"cron": "0 3 * * *"}, "cron", "give cron or interval_seconds, not both"),
        ({"payload": "{not json"}, "payload", "not JSON"),
        ({"payload": '{"user_id": -1, "data": "x"}'}, "payload", "greater than"),
        ({"timezone": "Mars/Olympus", "interval_seconds": "", "cron": "0 3 * * *"}, "timezone", ""),
        ({"interval_seconds": "0"}, "interval_seconds", "greater than or equal to 1"),
        ({"notify_url": "http://169.254.169.254/latest/"}, "notify_url", "not a public address"),
        ({"name": HOSTILE, "payload": "{"}, "payload", "not JSON"),
    ]:
        answer = app_client.post("/console/schedules", data={**base, **change})
        assert answer.status_code == 422, (change, answer.text)
        error = re.search(rf'id="error-{field}">([^<]*)<', answer.text)
        assert error, (change, answer.text)
        assert why in html.unescape(error.group(1)), (change, error.group(1))
        for value in change.values():
            if value:
                assert str(escape(value)) in answer.text  # kept, and inert
    assert HOSTILE not in app_client.get("/console/schedules").text
    assert api(app_client, keys.alice, "GET", "/api/v1/schedules")["items"] == []  # type: ignore[index]
    made = app_client.post(
        "/console/schedules", data={**base, "name": "n", "payload": '{"user_id": 1, "data": "x"}'}
    )
    assert made.is_redirect
    again = app_client.post(
        "/console/schedules", data={**base, "name": "n", "payload": '{"user_id": 1, "data": "x"}'}
    )
    assert again.status_code == 422
    assert re.search(r'id="error-name">[^<]*already exists for this API key<', again.text)
