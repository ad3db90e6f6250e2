"""Open-loop HTTP load for dispatch latency: POST bench.stamp tasks at a steady rate.

    python -m bench.loadgen URL RATE SECONDS MAX_LAG [CONNECTIONS]

URL is where tasks are submitted: taskdock's /api/v1/tasks, or the end-to-end floor's /tasks.

Each request is due at start + i/rate and carries that moment; the task records how long after
it it started, so a client that falls behind still counts the wait (no coordinated omission).
It gives up once it is MAX_LAG seconds behind schedule: the service cannot take that rate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

from bench.common import AUTH


async def run(
    url: str, rate: float, seconds: float, max_lag: float, connections: int
) -> dict[str, float]:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    slots = asyncio.Semaphore(connections)
    accepted = failed = sent = 0
    lagged = False

    async def post(client: httpx.AsyncClient, due_wall: float) -> None:
        nonlocal accepted, failed
        try:
            body = {"type": "bench.stamp", "payload": {"sent_at": due_wall}}
            response = await client.post(url, json=body)
            if response.status_code == 202:
                accepted += 1
            else:
                failed += 1
        except httpx.HTTPError:
            failed += 1
        finally:
            slots.release()

    async with httpx.AsyncClient(limits=limits, timeout=30, headers=AUTH) as client:
        await client.options(url)  # connect first; its answer does not matter
        pending: set[asyncio.Task[None]] = set()
        wall0, mono0 = time.time(), time.monotonic()
        for number in range(int(rate * seconds)):
            due = number / rate
            pause = due - (time.monotonic() - mono0)
            if pause > 0:
                await asyncio.sleep(pause)
            await slots.acquire()
            if time.monotonic() - mono0 - due > max_lag:
                slots.release()
                lagged = True
                break
            task = asyncio.create_task(post(client, wall0 + due))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        if pending:
            await asyncio.gather(*pending)
        elapsed = time.monotonic() - mono0
    return {
        "sent": sent,
        "accepted": accepted,
        "failed": failed,
        "seconds": elapsed,
        "lagged": float(lagged),
    }


def main(argv: list[str]) -> int:
    url, rate, seconds, max_lag, *rest = argv
    connections = int(rest[0]) if rest else 64
    out = asyncio.run(run(url, float(rate), float(seconds), float(max_lag), connections))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
