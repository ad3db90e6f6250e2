"""Waiting for a task and the event stream, against real API processes (app/tasks/events.py)."""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select, text, update

from app.auth import service as keys
from app.auth.service import Scope
from app.core.db import session_scope
from app.tasks import lifecycle
from app.tasks.models import Task
from tests.conftest import migrate_now
from tests.support import services
from tests.support.stack import Stack, base_env, running_stack, wait_status

PROCESS = {"type": "process_data", "payload": {"user_id": 7, "data": "hello"}}
FAST_EVENTS = {
    "TASKDOCK_AUTH_ENABLED": "true",
    "TASKDOCK_EVENTS_HEARTBEAT_SECONDS": "0.5",
    "TASKDOCK_EVENTS_POLL_INTERVAL": "0.1",
}


@dataclass
class System:
    env: dict[str, str]
    stack: Stack
    base: str
    alice: dict[str, str] = field(default_factory=dict)
    bob: dict[str, str] = field(default_factory=dict)

    def client(self, who: dict[str, str]) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=who, timeout=30)

    def submit(self, who: dict[str, str], body: dict[str, Any] = PROCESS) -> dict[str, Any]:
        with self.client(who) as client:
            response = client.post("/api/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        return dict(response.json())


def new_key(name: str) -> dict[str, str]:
    with session_scope() as session:
        _, plain = keys.create(session=session, name=name, scopes=[Scope.SUBMIT, Scope.READ])
    return {"Authorization": f"Bearer {plain}"}


def finish(task_id: str) -> float:
    """Run the task's attempt to success as a worker would; the time of the outcome's commit."""
    with session_scope() as session:
        claim = lifecycle.claim(
            session=session,
            task_id=uuid.UUID(task_id),
            attempt=1,
            worker="test@host",
            lease_seconds=30,
        )
    assert claim is not None
    # A run takes a moment: SQLite's poll (every 0.1 s here) sees RUNNING before the outcome;
    # changes within one poll reach a stream as the latest of them (docs/events.md).
    time.sleep(0.3)
    with session_scope() as session:
        assert lifecycle.succeed(session=session, claim=claim, result={"ok": True})
    return time.monotonic()


@pytest.fixture(params=["postgres", "embedded"])
def system(request: pytest.FixtureRequest, tmp_path: Path, configure: object) -> Iterator[System]:
    with contextlib_database(request.param) as url:
        extra = {"TASKDOCK_DATABASE_URL": url} if url else {}
        env = base_env(tmp_path / "data", **FAST_EVENTS, **extra)
        configure(env)  # type: ignore[operator]
        migrate_now()
        with running_stack(env, tmp_path / "logs") as stack:
            _, base = stack.api()
            yield System(env, stack, base, new_key("alice"), new_key("bob"))


@pytest.fixture
def pg_system(tmp_path: Path, configure: object) -> Iterator[System]:
    with services.scratch_database() as url:
        env = base_env(tmp_path / "data", **FAST_EVENTS, TASKDOCK_DATABASE_URL=url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        with running_stack(env, tmp_path / "logs") as stack:
            _, base = stack.api()
            yield System(env, stack, base, new_key("alice"), new_key("bob"))


class contextlib_database:  # noqa: N801 - used as a context manager, like contextlib's
    """A scratch PostgreSQL database's URL, or None for the embedded SQLite file."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._scratch: Any = None

    def __enter__(self) -> str | None:
        if self.kind != "postgres":
            return None
        self._scratch = services.scratch_database()
        return str(self._scratch.__enter__())

    def __exit__(self, *exc: object) -> None:
        if self._scratch is not None:
            self._scratch.__exit__(*exc)


@dataclass
class Event:
    id: str | None
    data: dict[str, Any] | None


class EventReader:
    """Reads an SSE stream in a thread; the test takes its events from a queue."""

    def __init__(
        self,
        base: str,
        headers: dict[str, str],
        params: Any = None,
        *,
        path: str = "/api/v1/events",
        cookies: httpx.Cookies | None = None,
    ) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.status: int | None = None
        self.comments: list[str] = []
        self.error: httpx.HTTPError | None = None
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._thread = threading.Thread(
            target=self._read, args=(base, headers, params, path, cookies), daemon=True
        )
        self._thread.start()
        assert self._opened.wait(10), "the stream did not open"

    def _read(
        self,
        base: str,
        headers: dict[str, str],
        params: Any,
        path: str,
        cookies: httpx.Cookies | None,
    ) -> None:
        try:
            self._stream(base, headers, params, path, cookies)
        except httpx.HTTPError as exc:
            self.error = exc  # the server went away: a test that kills it looks here

    def _stream(
        self,
        base: str,
        headers: dict[str, str],
        params: Any,
        path: str,
        cookies: httpx.Cookies | None,
    ) -> None:
        with (
            httpx.Client(base_url=base, headers=headers, cookies=cookies, timeout=10) as client,
            client.stream("GET", path, params=params) as response,
        ):
            self.status = response.status_code
            self._opened.set()
            current: dict[str, str] = {}
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("id: "):
                    current["id"] = line[4:]
                elif line.startswith("data: "):
                    current["data"] = line[6:]
                elif line == "" and "data" in current:
                    self.events.put(Event(current.get("id"), json.loads(current["data"])))
                    current = {}

    def take(self, count: int, *, timeout: float = 10) -> list[Event]:
        """The next `count` task events."""
        deadline = time.monotonic() + timeout
        found: list[Event] = []
        while len(found) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(found)} of {count} events: {found}")
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            found.append(event)
        return found

    def quiet_for(self, seconds: float) -> list[Event]:
        """The task events that came within `seconds` (expected: none)."""
        time.sleep(seconds)
        found: list[Event] = []
        while not self.events.empty():
            found.append(self.events.get())
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def statuses(events: list[Event]) -> list[tuple[str, str]]:
    return [(event.data["id"], event.data["status"]) for event in events if event.data]


# --- wait ----------------------------------------------------------------------------------


def test_wait_answers_at_the_finish(system: System) -> None:
    postgres = "TASKDOCK_DATABASE_URL" in system.env
    delays = []
    with system.client(system.alice) as client:
        for _ in range(5):
            task = system.submit(system.alice)
            answer: dict[str, Any] = {}

            def wait(task_id: str = task["id"], answer: dict[str, Any] = answer) -> None:
                response = client.get(f"/api/v1/tasks/{task_id}", params={"wait": 20})
                answer["at"] = time.monotonic()
                answer["response"] = response

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.5)  # the request is parked by now
            finished_at = finish(task["id"])
            waiter.join(timeout=20)
            response = answer["response"]
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "SUCCEEDED"
            assert response.json()["result"] == {"ok": True}
            delays.append(answer["at"] - finished_at)
    # PostgreSQL tells the API at commit; SQLite is looked at every 0.1 s here.
    bound = 0.1 if postgres else 0.1 + 0.15
    assert statistics.median(delays) < bound, delays
    assert max(delays) < 1.0, delays


def test_wait_times_out_with_the_current_record(system: System) -> None:
    task = system.submit(system.alice)
    with system.client(system.alice) as client:
        started = time.monotonic()
        response = client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 1})
        took = time.monotonic() - started
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "QUEUED"
        assert response.json()["id"] == task["id"]
        assert took >= 1.0

        for bad in ("0", "-1", "61", "soon"):
            refused = client.get(f"/api/v1/tasks/{task['id']}", params={"wait": bad})
            assert refused.status_code == 422, (bad, refused.text)
            assert "wait" in refused.text

        finish(task["id"])
        started = time.monotonic()
        done = client.get(f"/api/v1/tasks/{task['id']}", params={"wait": 30})
        assert done.json()["status"] == "SUCCEEDED"
        assert time.monotonic() - started < 5  # final already: no waiting at all

    with system.client(system.bob) as other:
        started = time.monotonic()
        hidden = other.get(f"/api/v1/tasks/{task['id']}", params={"wait": 30})
        assert hidden.status_code == 404
        assert time.monotonic() - started < 5
        missing = other.get(f"/api/v1/tasks/{uuid.uuid4()}", params={"wait": 30})
        assert missing.status_code == 404


def api_backends(url: str) -> dict[str, list[str]]:
    """The API's connections to the database, by application_name: each one's state."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT application_name, state FROM pg_stat_activity "
                    "WHERE datname = current_database() AND application_name LIKE 'taskdock-api%'"
                )
            ).all()
    finally:
        engine.dispose()
    found: dict[str, list[str]] = {}
    for name, state in rows:
        found.setdefault(name, []).append(state)
    return found


def test_a_thousand_waiters_hold_one_listen_connection(pg_system: System) -> None:
    url = pg_system.env["TASKDOCK_DATABASE_URL"]
    tasks = [pg_system.submit(pg_system.alice)["id"] for _ in range(4)]
    samples: list[dict[str, list[str]]] = []

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=1100, max_keepalive_connections=1100)
        async with httpx.AsyncClient(
            base_url=pg_system.base, headers=pg_system.alice, limits=limits, timeout=90
        ) as client:
            assert (await client.get(f"/api/v1/tasks/{tasks[0]}")).status_code == 200
            # Let in by fifties: each waiter's first read takes a pooled connection for a
            # moment, and a thousand at the same instant on a busy machine would wait for the
            # pool longer than its 2 s (503). Waiting is what this test is about.
            waiters: list[asyncio.Task[httpx.Response]] = []
            for _ in range(20):
                waiters += [
                    asyncio.create_task(
                        client.get(f"/api/v1/tasks/{tasks[n % 4]}", params={"wait": 60})
                    )
                    for n in range(50)
                ]
                await asyncio.sleep(0.5)
            # While they wait: sample who holds a database connection.
            for _ in range(12):
                await asyncio.sleep(0.5)
                samples.append(await asyncio.to_thread(api_backends, url))
            early = [waiter.result() for waiter in waiters if waiter.done()]
            assert early == [], [(response.status_code, response.text) for response in early]
            for task_id in tasks:
                await asyncio.to_thread(finish, task_id)
            return await asyncio.gather(*waiters)

    responses = asyncio.run(run())

    assert all(response.status_code == 200 for response in responses)
    assert {response.json()["status"] for response in responses} == {"SUCCEEDED"}
    assert len({response.json()["id"] for response in responses}) == 4
    # One LISTEN connection the whole time, and the API's other connections idle: the waiters
    # hold none while they wait. Those are the asyncio pool's (pool size + overflow, 20) and
    # the process's synchronous engine's, never one per waiter.
    late = samples[4:]
    assert all(sample.get("taskdock-api-events") == ["idle"] for sample in late), samples
    for sample in late:
        pooled = sample.get("taskdock-api", [])
        assert len(pooled) <= 25, sample
        assert all(state == "idle" for state in pooled), sample


# --- stream --------------------------------------------------------------------------------


def test_stream_tells_each_change_of_a_task_run_by_a_worker(pg_system: System) -> None:
    pg_system.stack.worker()
    reader = EventReader(pg_system.base, pg_system.alice)
    try:
        assert reader.status == 200
        task = pg_system.submit(pg_system.alice)
        events = reader.take(3)
        assert statuses(events) == [
            (task["id"], "QUEUED"),
            (task["id"], "RUNNING"),
            (task["id"], "SUCCEEDED"),
        ]
        ids = [int(event.id or 0) for event in events]
        assert ids == sorted(ids)
        assert len(set(ids)) == 3
        summary = events[-1].data or {}
        assert summary["type"] == "process_data"
        assert summary["queue"] == task["queue"]
        assert "payload" not in summary
        assert "result" not in summary
    finally:
        reader.close()


def test_stream_filters_and_owners(system: System) -> None:
    mine = EventReader(system.base, system.alice)
    done_only = EventReader(system.base, system.alice, params={"status": "SUCCEEDED"})
    other_type = EventReader(system.base, system.alice, params={"type": "sleep"})
    theirs = EventReader(system.base, system.bob)
    try:
        first = system.submit(system.alice)
        second = system.submit(system.alice)
        by_id = EventReader(system.base, system.alice, params={"task_id": second["id"]})
        try:
            # Seen before the runs start: SQLite's poll tells a stream only the latest state of
            # a task that changed twice within one interval (docs/events.md).
            assert statuses(mine.take(2)) == [(first["id"], "QUEUED"), (second["id"], "QUEUED")]
            finish(first["id"])
            finish(second["id"])
            assert statuses(mine.take(4)) == [
                (first["id"], "RUNNING"),
                (first["id"], "SUCCEEDED"),
                (second["id"], "RUNNING"),
                (second["id"], "SUCCEEDED"),
            ]
            assert statuses(done_only.take(2)) == [
                (first["id"], "SUCCEEDED"),
                (second["id"], "SUCCEEDED"),
            ]
            assert statuses(by_id.take(2)) == [
                (second["id"], "RUNNING"),
                (second["id"], "SUCCEEDED"),
            ]
            assert other_type.quiet_for(0.5) == []
            assert by_id.quiet_for(0) == []
        finally:
            by_id.close()
        # Another owner's stream is open all along and hears nothing of alice's tasks...
        assert theirs.quiet_for(0.3) == []
        # ...but does hear its own, and heartbeats keep an idle stream alive.
        own = system.submit(system.bob)
        assert statuses(theirs.take(1)) == [(own["id"], "QUEUED")]
        assert "heartbeat" in theirs.comments
    finally:
        for reader in (mine, done_only, other_type, theirs):
            reader.close()

    with system.client(system.alice) as client:
        for params in ({"status": "DONE"}, {"task_id": "nope"}):
            refused = client.get("/api/v1/events", params=params)
            assert refused.status_code == 422, refused.text
        for bad in ("x", "-1", str(2**63)):
            refused = client.get("/api/v1/events", headers={"Last-Event-ID": bad})
            assert refused.status_code == 422, (bad, refused.text)
        assert httpx.get(f"{system.base}/api/v1/events").status_code == 401


def console_session(base: str, who: dict[str, str]) -> httpx.Cookies:
    """A console session's cookies, logged in through the form with `who`'s key."""
    with httpx.Client(base_url=base, timeout=10) as client:
        form = client.get("/console/login")
        token = re.search(r'name="token" value="([^"]*)"', form.text)
        assert token, form.text
        key = who["Authorization"].removeprefix("Bearer ")
        answer = client.post("/console/login", data={"token": token.group(1), "api_key": key})
        assert answer.status_code == 303, answer.text
        return client.cookies


def test_the_consoles_stream_tells_the_sessions_own_tasks(system: System) -> None:
    """/console/events, which the console's pages follow: the API's stream, by session."""
    cookies = console_session(system.base, system.alice)
    everything = EventReader(system.base, {}, path="/console/events", cookies=cookies)
    try:
        system.submit(system.bob)
        mine = system.submit(system.alice)
        one = EventReader(
            system.base,
            {},
            params={"task_id": mine["id"]},
            path="/console/events",
            cookies=cookies,
        )
        try:
            assert statuses(everything.take(1)) == [(mine["id"], "QUEUED")]
            other = system.submit(system.alice)
            finish(mine["id"])
            assert statuses(one.take(2)) == [(mine["id"], "RUNNING"), (mine["id"], "SUCCEEDED")]
            assert statuses(everything.take(3)) == [
                (other["id"], "QUEUED"),
                (mine["id"], "RUNNING"),
                (mine["id"], "SUCCEEDED"),
            ]
            # Bob's task, submitted first, never came.
            assert everything.quiet_for(0.3) == []
        finally:
            one.close()
    finally:
        everything.close()
    # No session, no stream: the login page instead.
    refused = httpx.get(f"{system.base}/console/events", timeout=10)
    assert refused.status_code == 303
    assert refused.headers["location"] == "/console/login"


def test_last_event_id_resumes_without_loss(system: System) -> None:
    reader = EventReader(system.base, system.alice)
    try:
        first = system.submit(system.alice)
        (seen,) = reader.take(1)
    finally:
        reader.close()
    # While nobody listens: the first task runs, a second is submitted, bob's too.
    finish(first["id"])
    second = system.submit(system.alice)
    system.submit(system.bob)

    resumed = EventReader(system.base, {**system.alice, "Last-Event-ID": seen.id or ""})
    try:
        replay = resumed.take(2)
        assert statuses(replay) == [(first["id"], "SUCCEEDED"), (second["id"], "QUEUED")]
        # ...then live, with nothing sent twice.
        finish(second["id"])
        live = resumed.take(2)
        assert statuses(live) == [(second["id"], "RUNNING"), (second["id"], "SUCCEEDED")]
        assert resumed.quiet_for(0.5) == []
        ids = [int(event.id or 0) for event in replay + live]
        assert ids == sorted(ids)
        assert int(seen.id or 0) < ids[0]
    finally:
        resumed.close()


# --- PostgreSQL going away -------------------------------------------------------------------


def test_the_hub_survives_a_postgres_restart(tmp_path: Path, configure: object) -> None:
    with services.private_postgres() as server:
        url = server.create_database("taskdock")
        env = base_env(tmp_path / "data", **FAST_EVENTS, TASKDOCK_DATABASE_URL=url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        alice = new_key("alice")
        with running_stack(env, tmp_path / "logs") as stack:
            _, base = stack.api()
            reader = EventReader(base, alice)  # starts the hub
            try:
                first = System(env, stack, base).submit(alice)
                assert statuses(reader.take(1)) == [(first["id"], "QUEUED")]

                server.crash()
                for _ in range(10):
                    started = time.monotonic()
                    live = httpx.get(f"{base}/health/live", timeout=5)
                    assert live.status_code == 200
                    assert time.monotonic() - started < 1
                    time.sleep(0.2)
                server.start()

                # The hub is back: a new commit reaches the open stream, and the one LISTEN
                # connection is there again.
                def submitted() -> bool:
                    try:
                        return (
                            httpx.post(
                                f"{base}/api/v1/tasks", json=PROCESS, headers=alice, timeout=5
                            ).status_code
                            == 202
                        )
                    except httpx.HTTPError:
                        return False

                services.wait_for(submitted, timeout=30, what="the API to take tasks again")
                events = reader.take(1, timeout=30)
                assert events[0].data is not None
                assert events[0].data["status"] == "QUEUED"
                services.wait_for(
                    lambda: api_backends(url).get("taskdock-api-events") == ["idle"],
                    timeout=30,
                    what="one LISTEN connection",
                )
            finally:
                reader.close()
            with httpx.Client(base_url=base, headers=alice) as client:
                task = client.post("/api/v1/tasks", json=PROCESS).json()
                waited = {}

                def wait() -> None:
                    waited["response"] = client.get(
                        f"/api/v1/tasks/{task['id']}", params={"wait": 20}
                    )

                waiter = threading.Thread(target=wait)
                waiter.start()
                time.sleep(0.5)
                finish(task["id"])
                waiter.join(timeout=20)
                assert waited["response"].json()["status"] == "SUCCEEDED"
            assert "Traceback" not in stack.dump_logs()


def test_the_plain_get_opens_no_listen_connection(system: System) -> None:
    task = system.submit(system.alice)
    with system.client(system.alice) as client:
        response = client.get(f"/api/v1/tasks/{task['id']}")
    assert response.status_code == 200
    if "TASKDOCK_DATABASE_URL" in system.env:
        # No wait, no stream: the API has not opened its LISTEN connection.
        assert "taskdock-api-events" not in api_backends(system.env["TASKDOCK_DATABASE_URL"])


def test_only_a_status_change_takes_a_new_number(system: System) -> None:
    task = system.submit(system.alice)
    first = seq_of(task["id"])
    with session_scope() as session:
        session.execute(update(Task).where(Task.id == uuid.UUID(task["id"])).values(priority=5))
    assert seq_of(task["id"]) == first  # no status change, no new number
    finish(task["id"])
    assert seq_of(task["id"]) > first
    with system.client(system.alice) as client:
        assert wait_status(client, task["id"], {"SUCCEEDED"})


def seq_of(task_id: str) -> int:
    with session_scope() as session:
        value = session.scalar(select(Task.change_seq).where(Task.id == uuid.UUID(task_id)))
    assert value is not None
    return int(value)


# --- what the trigger sends ------------------------------------------------------------------


class NotificationSpy:
    """A LISTEN of its own on the events channel, which does not register as a listener."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._connection = psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
        )
        self._connection.execute("LISTEN taskdock_events")

    def received(self, seconds: float) -> list[dict[str, Any]]:
        """The notifications of the next `seconds`."""
        return [
            json.loads(notification.payload)
            for notification in self._connection.notifies(timeout=seconds)
        ]

    def close(self) -> None:
        self._connection.close()


def listeners(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return int(
                connection.execute(text("SELECT count(*) FROM task_event_listener")).scalar_one()
            )
    finally:
        engine.dispose()


def test_status_changes_notify_only_while_an_api_process_listens(
    tmp_path: Path, configure: object
) -> None:
    with services.scratch_database() as url:
        env = base_env(
            tmp_path / "data",
            **FAST_EVENTS,
            TASKDOCK_EVENTS_IDLE_SECONDS="1",
            TASKDOCK_DATABASE_URL=url,
        )
        configure(env)  # type: ignore[operator]
        migrate_now()
        alice = new_key("alice")
        spy = NotificationSpy(url)
        with running_stack(env, tmp_path / "logs") as stack:
            _, base = stack.api()
            system = System(env, stack, base, alice)
            try:
                # Nobody waits or streams: a task's changes are numbered, and send nothing.
                quiet = system.submit(alice)
                finish(quiet["id"])
                assert seq_of(quiet["id"]) > 0
                assert spy.received(1.0) == []
                assert listeners(url) == 0

                # A stream: its process registers, and each change is sent at its commit.
                reader = EventReader(base, alice)
                try:
                    services.wait_for(lambda: listeners(url) == 1, timeout=10, what="a listener")
                    loud = system.submit(alice)
                    sent = [
                        (event["id"], event["status"])
                        for event in spy.received(1.0)
                        if event["id"] == loud["id"]
                    ]
                    assert sent == [(loud["id"], "QUEUED")]
                    assert (loud["id"], "QUEUED") in statuses(reader.take(1))
                finally:
                    reader.close()

                # Nobody streams any more: after the idle time the process stops listening.
                services.wait_for(
                    lambda: listeners(url) == 0 and "taskdock-api-events" not in api_backends(url),
                    timeout=15,
                    what="the listener to leave",
                )
                later = system.submit(alice)
                assert spy.received(1.0) == []

                # A wait brings it back and still answers at the finish.
                with system.client(alice) as client:
                    done: dict[str, httpx.Response] = {}
                    waiter = threading.Thread(
                        target=lambda: done.update(
                            response=client.get(f"/api/v1/tasks/{later['id']}", params={"wait": 20})
                        )
                    )
                    waiter.start()
                    services.wait_for(lambda: listeners(url) == 1, timeout=10, what="a listener")
                    finish(later["id"])
                    waiter.join(timeout=20)
                assert done["response"].json()["status"] == "SUCCEEDED"
                sent = [(event["id"], event["status"]) for event in spy.received(1.0)]
                assert (later["id"], "SUCCEEDED") in sent
            finally:
                spy.close()
            assert "Traceback" not in stack.dump_logs()


def test_a_killed_api_process_leaves_no_listener_behind(tmp_path: Path, configure: object) -> None:
    with services.scratch_database() as url:
        env = base_env(tmp_path / "data", **FAST_EVENTS, TASKDOCK_DATABASE_URL=url)
        configure(env)  # type: ignore[operator]
        migrate_now()
        alice = new_key("alice")
        with running_stack(env, tmp_path / "logs") as stack:
            api, base = stack.api()
            reader = EventReader(base, alice)
            try:
                services.wait_for(lambda: listeners(url) == 1, timeout=10, what="a listener")
                api.signal_group(signal.SIGKILL)
                services.wait_for(
                    lambda: "taskdock-api-events" not in api_backends(url),
                    timeout=10,
                    what="the killed process's connection to end",
                )
            finally:
                reader.close()
            assert isinstance(reader.error, httpx.RemoteProtocolError), reader.error
            # Its row outlives it: the trigger would notify for nobody from now on...
            assert listeners(url) == 1
            # ...until the dispatcher's sweep (every TASKDOCK_REAPER_INTERVAL) drops it.
            stack.dispatcher()
            services.wait_for(lambda: listeners(url) == 0, timeout=15, what="the row to go")
