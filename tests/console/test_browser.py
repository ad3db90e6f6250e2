"""The console in a real Chromium (Playwright) against a real stack: PostgreSQL, Redis, a worker,
a dispatcher and an API with auth on. Screenshots of every page go to docs/console/.

Chromium is the system's (`chromium` on PATH): under CI=true a missing one fails, locally the
tests skip with the reason.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.support import services
from tests.support.stack import ROOT, Stack, base_env, running_stack, taskdock, wait_status
from tests.webhooks.receiver import receiving

pytestmark = pytest.mark.browser

SHOTS = ROOT / "docs" / "console"
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@dataclass(frozen=True)
class Console:
    base: str
    admin: str
    alice: str
    bob: str
    carol: str

    def api(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )


def create_key(env: dict[str, str], name: str, scopes: str) -> str:
    done = taskdock("keys", "create", "--name", name, "--scopes", scopes, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = shutil.which("chromium")
    services.require("Chromium", path is not None, "no `chromium` on PATH")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory, chromium_path: str) -> Iterator[Console]:
    services.require_redis()
    tmp = tmp_path_factory.mktemp("console")
    with services.scratch_database() as url:
        env = base_env(
            tmp / "data",
            TASKDOCK_DATABASE_URL=url,
            TASKDOCK_BROKER_URL=services.REDIS_URL,
            TASKDOCK_AUTH_ENABLED="true",
            TASKDOCK_API_KEY_CACHE_SECONDS="1",
            TASKDOCK_TASK_MODULES="",
            # The webhook receiver of the detail page's test listens on loopback.
            TASKDOCK_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        )
        migrated = taskdock("migrate", env=env)
        assert migrated.returncode == 0, migrated.stderr
        keys = {
            "admin": create_key(env, "admin", "admin"),
            "alice": create_key(env, "alice", "submit,read"),
            "bob": create_key(env, "bob", "submit,read"),
            "carol": create_key(env, "carol", "submit,read"),
        }
        with running_stack(env, tmp / "logs") as stack:
            stack.worker("w1", concurrency=2)
            stack.dispatcher()
            _, base = stack.api()
            try:
                yield Console(base=base, **keys)
            except BaseException:
                print(stack_logs(stack))
                raise


def stack_logs(stack: Stack) -> str:
    return stack.dump_logs()


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(20_000)
    yield opened
    context.close()


def login(page: Any, console: Console, key: str) -> None:
    page.goto(f"{console.base}/console")
    assert page.url.endswith("/console/login")
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{console.base}/console")


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def status_text(page: Any) -> str:
    return str(page.text_content("#status")).strip()


def wait_text(page: Any, selector: str, text: str, timeout: float = 30) -> None:
    page.wait_for_function(
        "([s, t]) => document.querySelector(s) && document.querySelector(s).textContent === t",
        arg=[selector, text],
        timeout=timeout * 1000,
    )


def test_log_in_submit_with_a_field_error_and_watch_it_run(page: Any, console: Console) -> None:
    page.goto(f"{console.base}/console/login")
    shot(page, "login")
    page.fill("#api_key", "tdk_00000000_wrong")
    page.click("button[type=submit]")
    assert "unknown or revoked" in str(page.text_content("#login-error"))
    login(page, console, console.alice)
    page.goto(f"{console.base}/console/submit?type=sleep")
    page.fill("#field-seconds", "900")
    page.click("#submit")
    error = str(page.text_content("#error-seconds"))
    assert "less than or equal to 300" in error
    shot(page, "submit")
    page.fill("#field-seconds", "1.5")
    page.fill("#field-countdown", "2")
    page.click("#submit")
    page.wait_for_url("**/console/tasks/*")
    # Set on this document: a reload would lose it.
    page.evaluate("window.__same_page = true")
    seen = [status_text(page)]
    assert seen == ["QUEUED"]
    deadline = time.monotonic() + 30
    while seen[-1] != "SUCCEEDED" and time.monotonic() < deadline:
        current = status_text(page)
        if current != seen[-1]:
            seen.append(current)
        time.sleep(0.1)
    assert seen == ["QUEUED", "RUNNING", "SUCCEEDED"]
    assert page.evaluate("window.__same_page") is True
    # Told by the event stream (the page reads its values again on each event; its own timer
    # alone, every 30 s, could not have shown RUNNING for the 1.5 s it lasted).
    assert page.evaluate("document.body.dataset.stream") == "open"
    assert page.evaluate("window.taskdockConsole.stats.events") >= 2
    wait_text(page, "[data-live-key=attempt]", "1 of 3")
    assert '"slept": 1.5' in str(page.text_content("#result"))
    assert page.is_hidden("#cancel")
    wait_text(page, "#runs tr[data-run='1.1'] .status", "SUCCEEDED")
    shot(page, "task")


def test_cancel_a_running_sleep(page: Any, console: Console) -> None:
    with console.api(console.alice) as api:
        task_id = api.post("/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 60}})
        task_id.raise_for_status()
        tid = task_id.json()["id"]
        wait_status(api, tid, {"RUNNING"})
        login(page, console, console.alice)
        page.goto(f"{console.base}/console/tasks/{tid}")
        assert status_text(page) == "RUNNING"
        page.click("#cancel")
        page.wait_for_url(f"**/console/tasks/{tid}")
        assert status_text(page) == "CANCELLED"
        assert api.get(f"/api/v1/tasks/{tid}").json()["status"] == "CANCELLED"
        assert page.is_visible("#retry")
        assert page.is_hidden("#cancel")


def test_retry_a_failed_task(page: Any, console: Console) -> None:
    with console.api(console.alice) as api:
        answer = api.post(
            "/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 0, "fail": True}}
        )
        tid = answer.json()["id"]
        failed = wait_status(api, tid, {"FAILED"}, timeout=60)
        assert failed["attempt"] == failed["max_attempts"] == 3
        login(page, console, console.alice)
        page.goto(f"{console.base}/console/tasks/{tid}")
        assert status_text(page) == "FAILED"
        assert "SleepFailed" in str(page.text_content("#error-type"))
        assert "asked to fail on attempt 3" in str(page.text_content("#error-message"))
        assert "Traceback" in str(page.text_content("#traceback"))
        shot(page, "task-failed")
        page.click("#retry")
        page.wait_for_url(f"**/console/tasks/{tid}")
        # A new attempt with a fresh budget, followed live to its end.
        wait_text(page, "#status", "FAILED", timeout=60)
        wait_text(page, "[data-live-key=attempt]", "6 of 6", timeout=60)
        assert api.get(f"/api/v1/tasks/{tid}").json()["attempt"] == 6
        # The runs timeline, live too: six runs, each FAILED with its own attempt's error.
        wait_text(page, "#runs tr[data-run='6.1'] .status", "FAILED")
        runs = page.locator("#runs tbody tr[data-run]")
        assert [runs.nth(i).get_attribute("data-run") for i in range(runs.count())] == [
            f"{attempt}.1" for attempt in range(1, 7)
        ]
        assert "asked to fail on attempt 4" in str(runs.nth(3).text_content())


def test_filter_and_page_through_500_tasks(page: Any, console: Console) -> None:
    with console.api(console.bob) as api:
        for number in range(500):
            answer = api.post(
                "/api/v1/tasks",
                json={
                    "type": "sleep",
                    "payload": {"seconds": number % 2},
                    "countdown": 3600,
                },
            )
            assert answer.status_code == 202
    login(page, console, console.bob)
    page.goto(f"{console.base}/console/tasks")
    assert page.text_content("#count") == "500"
    page.fill("#f-contains", '{"seconds": 1}')
    page.select_option("#f-status", "QUEUED")
    page.click("#apply")
    page.wait_for_load_state()
    assert page.text_content("#count") == "250"
    shot(page, "tasks")
    seen: list[str] = []
    for number in range(5):
        rows = page.locator("#task-list tbody tr[data-task]")
        assert rows.count() == 50
        seen += [str(rows.nth(i).get_attribute("data-task")) for i in range(50)]
        if number < 4:
            page.click("#next-page")
            page.wait_for_load_state()
    assert page.locator("#next-page").count() == 0
    assert len(set(seen)) == 250
    with console.api(console.bob) as api:
        for tid in seen[:3]:
            assert api.get(f"/api/v1/tasks/{tid}").json()["payload"]["seconds"] == 1


def test_the_list_shows_new_tasks_and_their_progress_without_a_reload(
    page: Any, console: Console
) -> None:
    login(page, console, console.alice)
    page.goto(f"{console.base}/console/tasks?type=sleep")
    page.evaluate("window.__same_page = true")
    with console.api(console.alice) as api:
        answer = api.post("/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 1}})
        tid = answer.json()["id"]
    row = page.locator(f'#task-list tr[data-task="{tid}"]')
    row.wait_for()
    assert page.locator("#task-list tbody tr").first.get_attribute("data-task") == tid
    page.wait_for_function(
        "(id) => { const r = document.querySelector(`tr[data-task='${id}'] .status`);"
        " return r && r.textContent === 'SUCCEEDED'; }",
        arg=tid,
        timeout=30_000,
    )
    assert page.evaluate("window.__same_page") is True


def test_hostile_text_is_shown_inert(page: Any, console: Console) -> None:
    effects: list[str] = []
    page.on("dialog", lambda dialog: (effects.append(dialog.message), dialog.dismiss()))
    page.on("console", lambda message: effects.append(message.text))
    with console.api(console.alice) as api:
        answer = api.post(
            "/api/v1/tasks",
            json={"type": "process_data", "payload": {"user_id": 1, "data": HOSTILE}},
            headers={"Idempotency-Key": HOSTILE[:200]},
        )
        tid = answer.json()["id"]
        wait_status(api, tid, {"SUCCEEDED"})
    login(page, console, console.alice)
    page.goto(f"{console.base}/console/tasks/{tid}")
    time.sleep(2)  # a live update or two has been applied
    # As JSON text: the quotes escaped by JSON, nothing by HTML.
    assert json.dumps(HOSTILE) in str(page.text_content("#payload"))
    assert HOSTILE[:200] == str(page.text_content("#idempotency-key"))
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.__xss") is None
    page.goto(f"{console.base}/console/tasks")
    time.sleep(2)
    assert page.locator("main img, main script").count() == 0
    assert page.evaluate("window.__xss") is None
    assert effects == []


def test_a_post_without_the_csrf_token_is_refused(page: Any, console: Console) -> None:
    login(page, console, console.alice)
    page.goto(f"{console.base}/console/submit?type=sleep")
    page.fill("#field-seconds", "0")
    page.evaluate("document.querySelector('#submit-form input[name=csrf]').remove()")
    with page.expect_response(f"{console.base}/console/submit") as answer:
        page.click("#submit")
    assert answer.value.status == 403
    assert "CSRF" in str(page.text_content("#error-message"))


def test_another_keys_task_is_404(page: Any, console: Console) -> None:
    with console.api(console.alice) as api:
        tid = api.post("/api/v1/tasks", json={"type": "sleep", "payload": {"seconds": 0}}).json()[
            "id"
        ]
    login(page, console, console.bob)
    answer = page.goto(f"{console.base}/console/tasks/{tid}")
    assert answer.status == 404
    assert "Error 404" in str(page.text_content("h1"))


def test_overview_types_and_log_out(page: Any, console: Console) -> None:
    login(page, console, console.admin)
    page.goto(f"{console.base}/console")
    assert page.text_content("#dispatcher") == "ok"
    assert "w1@" in str(page.text_content("main"))
    page.wait_for_function("() => document.body.dataset.liveState === 'ok'")
    shot(page, "overview")
    page.goto(f"{console.base}/console/types")
    assert page.locator("#type-sleep").is_visible()
    shot(page, "types")
    page.click("#logout")
    page.wait_for_url("**/console/login")
    page.goto(f"{console.base}/console/tasks")
    assert page.url.endswith("/console/login")


def test_the_detail_shows_webhook_deliveries_as_they_are_tried(page: Any, console: Console) -> None:
    with receiving([500, 200]) as receiver, console.api(console.carol) as api:
        login(page, console, console.carol)
        answer = api.post(
            "/api/v1/tasks",
            json={
                "type": "sleep",
                "payload": {"seconds": 1},
                "countdown": 1,
                "notify_url": receiver.url,
            },
        )
        assert answer.status_code == 202, answer.text
        tid = answer.json()["id"]
        page.goto(f"{console.base}/console/tasks/{tid}")
        page.evaluate("window.__same_page = true")
        assert page.text_content("#notify-url") == receiver.url
        assert page.locator("#webhooks tbody tr[data-delivery]").count() == 0
        # Refused once (500), then delivered: the row follows, without a reload.
        wait_text(page, "#webhooks tr[data-delivery] .status", "delivered", timeout=60)
        row = page.locator("#webhooks tbody tr[data-delivery]")
        assert row.count() == 1
        cells = [str(row.locator("td").nth(i).text_content()) for i in range(5)]
        assert cells[:5] == ["1", receiver.url, "delivered", "2", "200"]
        assert len(receiver.wait_for(2, timeout=5)) == 2
        assert page.evaluate("window.__same_page") is True


def test_bulk_retry_by_filter_after_the_dry_run_count(page: Any, console: Console) -> None:
    with console.api(console.carol) as api:
        ids = []
        for _ in range(12):
            answer = api.post(
                "/api/v1/tasks",
                json={"type": "sleep", "payload": {"seconds": 0}, "countdown": 3600},
            )
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
        for tid in ids:
            assert api.post(f"/api/v1/tasks/{tid}/cancel").json()["status"] == "CANCELLED"
    login(page, console, console.carol)
    page.goto(f"{console.base}/console/tasks")
    page.select_option("#f-status", "CANCELLED")
    page.select_option("#f-type", "sleep")
    page.click("#apply")
    page.wait_for_load_state()
    assert page.text_content("#count") == "12"
    page.click("#bulk-link")
    page.wait_for_url("**/console/bulk?*")
    page.select_option("#b-action", "retry")
    page.click("#count")
    page.wait_for_load_state()
    assert page.text_content("#matched") == "12"
    shot(page, "bulk")
    with console.api(console.carol) as api:
        # The count changed nothing.
        assert {api.get(f"/api/v1/tasks/{t}").json()["status"] for t in ids} == {"CANCELLED"}
    assert str(page.text_content("#confirm")).strip() == "Retry these 12 tasks"
    page.click("#confirm")
    page.wait_for_url("**/console/bulk?*")
    assert "Retried 12 tasks." in str(page.text_content("#bulk-done"))
    assert page.text_content("#matched") == "0"
    with console.api(console.carol) as api:
        for tid in ids:
            task = wait_status(api, tid, {"SUCCEEDED"}, timeout=60)
            assert task["attempt"] == 2


def test_create_and_pause_a_schedule(page: Any, console: Console) -> None:
    login(page, console, console.carol)
    page.goto(f"{console.base}/console/schedules")
    page.fill("#s-name", "hourly-report")
    page.select_option("#s-type", "process_data")
    page.fill("#s-payload", '{"user_id": 7, "data": "report"}')
    page.fill("#s-cron", "0 * * * *")
    page.fill("#s-timezone", "Nowhere/City")
    page.click("#create-schedule")
    assert "unknown time zone" in str(page.text_content("#error-timezone")).lower()
    # The form kept what was typed.
    assert page.input_value("#s-payload") == '{"user_id": 7, "data": "report"}'
    page.fill("#s-timezone", "Europe/Berlin")
    page.click("#create-schedule")
    page.wait_for_url("**/console/schedules")
    row = page.locator("#schedule-list tr[data-schedule]")
    assert row.count() == 1
    assert "0 * * * * (Europe/Berlin)" in str(row.text_content())
    assert row.get_attribute("data-paused") == "no"
    row.locator("button.pause").click()
    page.wait_for_url("**/console/schedules")
    row = page.locator("#schedule-list tr[data-schedule]")
    assert row.get_attribute("data-paused") == "yes"
    assert "paused" in str(row.locator(".next").text_content())
    shot(page, "schedules")
    sid = row.get_attribute("data-schedule")
    with console.api(console.carol) as api:
        assert api.get(f"/api/v1/schedules/{sid}").json()["paused"] is True
        # Another key sees none of it.
    with console.api(console.bob) as api:
        assert api.get(f"/api/v1/schedules/{sid}").status_code == 404
