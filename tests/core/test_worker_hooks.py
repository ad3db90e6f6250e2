"""The consumer heartbeat is withheld when the worker's loop runs but does not consume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from app.core.worker_hooks import ConsumerHeartbeat


def heartbeat(tmp_path: Path, consumer: object) -> ConsumerHeartbeat:
    step = ConsumerHeartbeat.__new__(ConsumerHeartbeat)
    step.path = tmp_path / "worker.heartbeat"
    step.tref = None
    step.consumer = consumer
    return step


def test_beats_while_connected_and_subscribed(tmp_path: Path) -> None:
    consumer = SimpleNamespace(
        connection=SimpleNamespace(connected=True),
        task_consumer=SimpleNamespace(_active_tags={"default": "tag"}),
    )
    step = heartbeat(tmp_path, consumer)

    step._beat()

    assert step.path.exists()


def test_withheld_when_disconnected_or_unsubscribed(tmp_path: Path) -> None:
    for consumer in (
        SimpleNamespace(connection=SimpleNamespace(connected=False), task_consumer=object()),
        SimpleNamespace(connection=None, task_consumer=object()),
        SimpleNamespace(
            connection=SimpleNamespace(connected=True),
            task_consumer=SimpleNamespace(_active_tags={}),
        ),
        SimpleNamespace(connection=SimpleNamespace(connected=True), task_consumer=None),
    ):
        step = heartbeat(tmp_path, consumer)
        step._beat()
        assert not step.path.exists(), consumer
