"""The API's side of publication: the group commit and the batched publish, on each backend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from app.api.deps import Database
from app.core.config import get_settings
from app.core.db import session_scope
from app.tasks import publication, service
from app.tasks.exceptions import QuotaExceeded
from app.tasks.models import Task
from app.tasks.publication import Batches, Publisher, Submitter
from app.tasks.registry import time_limits
from app.tasks.schemas import TaskCreate
from tests.conftest import migrate_now
from tests.support import services
from tests.support.stack import base_env

PROCESS = TaskCreate.model_validate(
    {"type": "process_data", "payload": {"user_id": 1, "data": "x"}}
)


def new_row(**changes: Any) -> dict[str, Any]:
    row = service.prepare(data=PROCESS, owner="", idempotency_key=None, extra_queues=[])
    row.update(changes)
    return row


def test_calls_during_a_flush_go_together_in_the_next() -> None:
    flushed: list[list[int]] = []

    async def flush(items: list[int]) -> list[int]:
        flushed.append(items)
        await asyncio.sleep(0.01)  # a round trip, during which more calls arrive
        return [item * 10 for item in items]

    async def main() -> list[int]:
        batches: Batches[int, int] = Batches(flush, max_items=3)
        first = asyncio.ensure_future(batches.submit(0))
        await asyncio.sleep(0)  # the first flush is in flight, alone
        rest = [batches.submit(item) for item in range(1, 6)]
        return [await first, *await asyncio.gather(*rest)]

    outcomes = asyncio.run(main())

    assert outcomes == [0, 10, 20, 30, 40, 50]  # each caller gets its own outcome
    assert flushed == [[0], [1, 2, 3], [4, 5]]  # no more than max_items in one


def test_a_row_the_database_refuses_fails_alone(backend: dict[str, str]) -> None:
    settings = get_settings()
    good = [new_row(), new_row()]
    bad = new_row(priority=42)  # the table's CHECK refuses it

    async def main() -> list[BaseException | None]:
        database = Database(settings=settings)
        publisher = Publisher(services.celery_app(), timeout=1.0)
        submitter = Submitter(settings=settings, database=database, publisher=publisher)
        try:
            # Submitted together, so they share one INSERT until it fails.
            outcomes = await asyncio.gather(
                *(submitter._commits.submit(row) for row in [good[0], bad, good[1]]),
                return_exceptions=True,
            )
        finally:
            await publisher.close()
            await database.close()
        return [outcome if isinstance(outcome, BaseException) else None for outcome in outcomes]

    first, refused, second = asyncio.run(main())

    assert first is None
    assert second is None
    assert refused is not None
    assert "priority" in str(refused)
    with session_scope() as session:
        ids = set(session.scalars(select(Task.id)))
        assert session.scalar(select(func.count()).select_from(Task)) == 2
    assert ids == {good[0]["id"], good[1]["id"]}


def submit_five() -> list[tuple[dict[str, Any] | Task, bool]]:
    """Five submissions at once: they share one INSERT and one publish."""
    settings = get_settings()

    async def main() -> list[tuple[dict[str, Any] | Task, bool]]:
        database = Database(settings=settings)
        publisher = Publisher(services.celery_app(), timeout=2.0)
        submitter = Submitter(settings=settings, database=database, publisher=publisher)
        try:
            return await asyncio.gather(
                *(
                    submitter.submit(
                        data=PROCESS, owner="", idempotency_key=None, request_id=None, quota=0
                    )
                    for _ in range(5)
                )
            )
        finally:
            await publisher.close()
            await database.close()

    answers = asyncio.run(main())
    assert [created for _, created in answers] == [True] * 5
    return answers


def recorded() -> dict[Any, tuple[Any, Any]]:
    with session_scope() as session:
        rows = session.execute(select(Task.id, Task.published_at, Task.queued_at)).all()
    return {row.id: (row.published_at, row.queued_at) for row in rows}


def test_a_batch_is_recorded_and_published(backend: dict[str, str]) -> None:
    answers = submit_five()

    rows = recorded()
    assert {record["id"] for record, _ in answers if isinstance(record, dict)} == set(rows)
    assert all(published is not None for published, _ in rows.values())


def test_a_batch_the_broker_did_not_take_is_left_to_the_dispatcher(
    tmp_path: Path, configure: object
) -> None:
    with services.scratch_database() as url:
        closed = f"redis://127.0.0.1:{services.free_port()}/0"
        env = base_env(tmp_path / "data", TASKDOCK_DATABASE_URL=url, TASKDOCK_BROKER_URL=closed)
        configure(env)  # type: ignore[operator]
        migrate_now()
        answers = submit_five()
        rows = recorded()

    assert {record["id"] for record, _ in answers if isinstance(record, dict)} == set(rows)
    # Told so in each answer and in the record: the outbox has them.
    assert [record.get("queued_at") for record, _ in answers if isinstance(record, dict)] == [
        None
    ] * 5
    assert set(rows.values()) == {(None, None)}


def test_the_quota_counts_a_keys_unfinished_tasks(backend: dict[str, str]) -> None:
    settings = get_settings()
    with session_scope() as session:
        for _ in range(3):
            service.submit(
                session=session,
                data=PROCESS,
                owner="alice",
                idempotency_key=None,
                extra_queues=[],
            )

    async def main() -> list[str]:
        database = Database(settings=settings)
        publisher = Publisher(services.celery_app(), timeout=1.0)
        submitter = Submitter(settings=settings, database=database, publisher=publisher)
        answers = []
        try:
            for owner, limit in [("alice", 4), ("alice", 3), ("bob", 1)]:
                try:
                    await submitter.quota.check(owner=owner, limit=limit)
                    answers.append("ok")
                except QuotaExceeded as exc:
                    answers.append(exc.code)
        finally:
            await publisher.close()
            await database.close()
        return answers

    assert asyncio.run(main()) == ["ok", "quota_exceeded", "ok"]


def bell_for(queue: str, *, attempt: int = 1, priority: int = 5) -> publication.Doorbell:
    return publication.Doorbell(
        task_id=uuid.uuid4(),
        attempt=attempt,
        type="process_data",
        queue=queue,
        priority=priority,
        limits=time_limits("process_data", settings=get_settings()),
        request_id="bell-1",
    )


def test_a_message_is_the_one_celerys_send_task_makes(
    backend: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`send` builds Celery's protocol-2 message itself; it must be the message send_task
    makes, so any Celery worker, `celery inspect` and Flower read it."""
    app = services.celery_app()
    queue = f"format-{uuid.uuid4().hex[:8]}"
    bell = bell_for(queue, attempt=2, priority=3)

    def publish(*, celerys_own: bool) -> Any:
        monkeypatch.setattr(publication, "_celery_listens", lambda _app: celerys_own)
        with app.producer_or_acquire() as producer:
            publication.send(app, bell, producer=producer)
        with app.connection_for_read() as connection:
            channel = connection.default_channel
            found = None
            for _ in range(50):
                found = channel.basic_get(queue, no_ack=True)
                if found is not None:
                    return found
                time.sleep(0.1)
        raise AssertionError(f"no message in {queue}")

    try:
        own = publish(celerys_own=False)
        celerys = publish(celerys_own=True)
    finally:
        with app.connection_for_write() as connection:
            connection.default_channel.queue_delete(queue)

    assert own.body == celerys.body
    assert own.headers == {**celerys.headers, "ignore_result": False}
    assert own.headers["taskdock_type"] == "process_data"
    assert own.headers["timelimit"] == celerys.headers["timelimit"]
    assert own.delivery_info.get("priority") == celerys.delivery_info.get("priority")
    # send_task also copies argsrepr and kwargsrepr into the properties; the headers carry them
    # (and are the properties' application_headers on AMQP, compared above).
    ignored = {"delivery_tag", "argsrepr", "kwargsrepr", "application_headers"}
    assert {k: v for k, v in own.properties.items() if k not in ignored} == {
        k: v for k, v in celerys.properties.items() if k not in ignored
    }


@pytest.fixture
def private_redis(tmp_path: Path, configure: object) -> Iterator[services.RedisServer]:
    """A redis-server of this test's own as the broker: it may be paused."""
    server = services.RedisServer(tmp_path / "redis")
    server.start()
    try:
        configure(base_env(tmp_path / "data", TASKDOCK_BROKER_URL=server.url))  # type: ignore[operator]
        yield server
    finally:
        if server.process is not None:
            server.process.send_signal(signal.SIGCONT)
        server.stop()


def counting_threads(publisher: Publisher) -> list[int]:
    """How many batches went through the publisher's thread."""
    calls: list[int] = []
    in_thread = publisher._send_in_thread

    def counted(bells: list[publication.Doorbell]) -> tuple[int, Exception | None]:
        calls.append(len(bells))
        return in_thread(bells)

    publisher._send_in_thread = counted  # type: ignore[method-assign]
    return calls


def test_once_warm_the_event_loop_sends_the_message_the_thread_sent(
    private_redis: services.RedisServer,
) -> None:
    app = services.celery_app()
    queue = f"loop-{uuid.uuid4().hex[:8]}"
    app.amqp.queues[queue]  # known before the publisher warms up, as every queue is at start
    bell = bell_for(queue)

    async def main() -> tuple[list[bool], list[int]]:
        publisher = Publisher(app, timeout=2.0)
        threads = counting_threads(publisher)
        try:
            # The first batch opens the loop's channel, from the thread.
            sent = [await publisher.publish(bell)]
            sent += [await publisher.publish(bell), await publisher.publish(bell)]
        finally:
            await publisher.close()
        return sent, threads

    sent, threads = asyncio.run(main())

    assert sent == [True, True, True]
    assert threads == [1]  # the later two went from the event loop
    broker = redis.Redis(port=private_redis.port)
    keys = broker.keys(f"{queue}*")
    assert len(keys) == 1  # one priority's list: the same routing
    messages = [json.loads(raw) for raw in reversed(broker.lrange(keys[0], 0, -1))]
    for message in messages:
        assert message["properties"].pop("delivery_tag")
        # Celery's reply queue for this thread (`app.thread_oid`): taskdock's jobs send none.
        assert message["properties"].pop("reply_to")
    assert messages[1] == messages[0]
    assert messages[2] == messages[0]
    assert messages[0]["headers"]["id"] == f"{bell.task_id}.1"
    assert messages[0]["headers"]["taskdock_type"] == "process_data"


def test_a_broker_gone_silent_after_warm_up_costs_the_timeout_and_then_recovers(
    private_redis: services.RedisServer,
) -> None:
    app = services.celery_app()
    bell = bell_for("default")
    assert private_redis.process is not None
    pid = private_redis.process.pid

    async def main() -> tuple[list[bool], float, list[int]]:
        publisher = Publisher(app, timeout=1.0, quiet_seconds=0.5)
        threads = counting_threads(publisher)
        pipeline = publisher._loop_pipeline
        assert pipeline is not None
        try:
            sent = [await publisher.publish(bell)]  # from the thread, which warms up
            assert pipeline.takes([bell])
            os.kill(pid, signal.SIGSTOP)  # its connections stay open, and nothing answers
            started = time.monotonic()
            sent.append(await publisher.publish(bell))
            elapsed = time.monotonic() - started
            assert publisher.quiet
            assert not pipeline.takes([bell])  # the thread opens a channel afresh
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.6)
            sent += [await publisher.publish(bell), await publisher.publish(bell)]
        finally:
            await publisher.close()
        return sent, elapsed, threads

    sent, elapsed, threads = asyncio.run(main())

    assert sent == [True, False, True, True]
    assert 0.9 < elapsed < 1.5  # TASKDOCK_PUBLISH_TIMEOUT, not the socket's 5 s
    assert threads == [1, 1]  # the first after warm-up and the first after the pause
