"""The embedded broker under concurrent producers and consumers: no message lost or doubled."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

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
