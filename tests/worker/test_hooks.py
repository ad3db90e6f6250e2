"""The worker's own steps: the consumer heartbeat and the timer sweep."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from kombu.asynchronous.timer import Timer

from app.worker.hooks import ConsumerHeartbeat, TimerSweep, sweep_cancelled


def heartbeat(tmp_path: Path, consumer: object) -> ConsumerHeartbeat:
    step = ConsumerHeartbeat.__new__(ConsumerHeartbeat)
    step.path = tmp_path / "worker.heartbeat"
    step.tref = None
    step.consumer = consumer
    step.record = None
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


# The timer sweep, on kombu's own event-loop timer.


def test_sweep_drops_cancelled_entries_and_keeps_the_live_ones_in_order() -> None:
    timer = Timer()
    fired: list[int] = []
    dead = [timer.call_after(300, fired.append, (n,)) for n in range(1000)]
    live = [timer.call_after(delay, fired.append, (n,)) for n, delay in ((1, 0.0), (2, 600))]
    timer.call_at(0.0, fired.append, (3,))  # already due
    for entry in dead:
        entry.cancel()

    assert sweep_cancelled(timer) == 1000
    assert len(timer) == 3
    assert sweep_cancelled(timer) == 0
    assert [event.entry for event in timer.queue][-1] is live[-1]  # still a heap, by eta

    # Run the timer: both due entries fire, the far one waits.
    for _ in range(4):
        _, entry = next(iter(timer))
        if entry is None:
            break
        timer.apply_entry(entry)
    assert sorted(fired) == [1, 3]
    assert len(timer) == 1


def test_sweep_works_under_an_iterator_that_started_before_it() -> None:
    timer = Timer()
    schedule = iter(timer)  # the hub holds one such iterator for the worker's life
    fired: list[str] = []
    timer.call_after(300, fired.append, ("dead",)).cancel()
    timer.call_at(0.0, fired.append, ("due",))

    sweep_cancelled(timer)
    _, entry = next(schedule)

    assert entry is not None
    timer.apply_entry(entry)
    assert fired == ["due"]
    assert next(schedule) == (None, None)  # nothing left: the dead entry went with the sweep


def test_the_sweep_is_a_step_of_event_loop_workers_only() -> None:
    from app.worker.celery import celery_app

    assert TimerSweep in celery_app.steps["worker"]
    step = TimerSweep.__new__(TimerSweep)
    assert step.include_if(SimpleNamespace(use_eventloop=True))
    assert not step.include_if(SimpleNamespace(use_eventloop=False))
