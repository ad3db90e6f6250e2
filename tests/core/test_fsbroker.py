"""The embedded broker under concurrent producers and consumers: no message lost or doubled."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from tests.support.stack import ROOT

CONSUMER = textwrap.dedent(
    """
    import json, sys
    from kombu import Connection
    folder, out = sys.argv[1], sys.argv[2]
    options = {"data_folder_in": folder, "data_folder_out": folder, "polling_interval": 0.01}
    seen = []
    with Connection("filesystem://localhost/", transport="app.core.fsbroker:Transport",
                    transport_options=options) as conn:
        queue = conn.SimpleQueue("default")
        idle = 0
        while idle < 30:
            try:
                message = queue.get(timeout=0.1)
            except Exception as exc:
                if type(exc).__name__ != "Empty":
                    seen.append({"error": repr(exc)})
                idle += 1
                continue
            idle = 0
            seen.append(message.payload["n"])
            message.ack()
    json.dump(seen, open(out, "w"))
    """
)


@pytest.mark.slow
def test_no_message_is_lost_between_processes(tmp_path: Path) -> None:
    folder = tmp_path / "queue"
    folder.mkdir()
    outputs = [tmp_path / f"consumer-{index}.json" for index in range(2)]
    consumers = [
        subprocess.Popen([sys.executable, "-c", CONSUMER, str(folder), str(out)], cwd=ROOT)
        for out in outputs
    ]
    options = {"data_folder_in": str(folder), "data_folder_out": str(folder)}
    with Connection(
        "filesystem://localhost/",
        transport="app.core.fsbroker:Transport",
        transport_options=options,
    ) as connection:
        queue = connection.SimpleQueue("default")
        for number in range(1500):
            queue.put({"n": number})
    for consumer in consumers:
        assert consumer.wait(timeout=120) == 0

    received = [item for out in outputs for item in json.loads(out.read_text())]
    errors = [item for item in received if isinstance(item, dict)]
    assert errors == []
    assert sorted(received) == list(range(1500))


def fs_connection(tmp_path: Path, **extra: Any) -> Connection:
    for name in ("queue", "control"):
        (tmp_path / name).mkdir(exist_ok=True)
    options = {
        "data_folder_in": str(tmp_path / "queue"),
        "data_folder_out": str(tmp_path / "queue"),
        "control_folder": str(tmp_path / "control"),
        **extra,
    }
    return Connection(
        "filesystem://localhost/",
        transport="app.core.fsbroker:Transport",
        transport_options=options,
    )


@pytest.mark.parametrize("kind", ["topic", "fanout"])
def test_a_monitors_event_queue_expires_once_nobody_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # Flower and `celery events` each bind a queue of their own to Celery's event exchange (a
    # topic exchange; workers' control queues are on a fanout one), with an expiry. A stopped
    # monitor's queue must not collect every event for ever.
    from kombu import Exchange, Queue

    from app.core import fsbroker

    monkeypatch.setattr(fsbroker, "MARK_INTERVAL", 0.1)
    events = Exchange(f"events-{kind}", type=kind)
    with fs_connection(tmp_path) as monitor, fs_connection(tmp_path) as worker:
        expiring = Queue("events.monitor", events, routing_key="#", expires=1.0, auto_delete=True)
        expiring = expiring(monitor.channel())
        expiring.declare()
        lasting = Queue("events.keeper", events, routing_key="#")(monitor.channel())
        lasting.declare()
        producer = worker.Producer()

        def publish(n: int) -> None:
            producer.publish({"n": n}, exchange=events, routing_key="task.sent", declare=[events])

        def queued(queue: str) -> int:
            return len(list((tmp_path / "queue").glob(f"*.{queue}.msg")))

        publish(1)
        message = expiring.get(no_ack=True)
        assert message is not None
        assert message.payload == {"n": 1}

        time.sleep(1.3)  # the monitor reads nothing for longer than its queue's expiry
        publish(2)
        publish(3)
        assert queued("events.monitor") == 0
        assert queued("events.keeper") == 3  # no expiry: kept, whoever reads it
        assert (
            "events.monitor" not in (tmp_path / "control" / f"events-{kind}.exchange").read_text()
        )
        assert not (tmp_path / "control" / "events.monitor.expires").exists()

        # A monitor that was only paused reads again: it is bound again, as after a redeclare.
        time.sleep(0.2)
        assert expiring.get(no_ack=True) is None
        publish(4)
        message = expiring.get(no_ack=True)
        assert message is not None
        assert message.payload == {"n": 4}


def test_an_ack_lets_the_next_message_in_at_once_not_at_the_next_poll(tmp_path: Path) -> None:
    # A worker with acks_late and prefetch 1 per pool process polls nothing while its window is
    # full. kombu's loop then slept a whole polling interval, and `taskdock dev` (0.1 s) ran at
    # most 20 tasks a second, however short they were. Here the interval is ten minutes: the
    # second message can only come in time if the ack of the first one wakes the loop.
    from kombu import Queue

    with fs_connection(tmp_path, polling_interval=600.0) as connection:
        queue = Queue("default", routing_key="default")
        producer = connection.Producer()
        for number in (1, 2):
            producer.publish({"n": number}, routing_key="default", declare=[queue])
        received: list[Any] = []
        consumer = connection.Consumer([queue], callbacks=[lambda _, m: received.append(m)])
        consumer.qos(prefetch_count=1)
        with consumer:
            # Either may come first: two messages named in the same millisecond have no order.
            connection.drain_events(timeout=5)
            assert len(received) == 1

            # The window is full: the next poll finds nothing to take until the ack.
            drained = threading.Thread(target=connection.drain_events, daemon=True)
            drained.start()
            time.sleep(0.3)
            assert len(received) == 1
            received[0].ack()
            drained.join(timeout=30)
            assert not drained.is_alive(), "the ack did not end the wait: the poll interval did"
            assert sorted(message.payload["n"] for message in received) == [1, 2]
            received[1].ack()
