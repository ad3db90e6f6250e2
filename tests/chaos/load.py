"""Steady submissions from a client that records every request's fate, as Jepsen's clients do."""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from tests.chaos.tasks import TASK_TYPE

ACCEPTED = "accepted"
# The API answered with an error, or the connection was refused before a byte was sent:
# either way nothing may have been recorded.
REJECTED = "rejected"
# A timeout or a broken connection after the request went out: it may or may not exist.
INDETERMINATE = "indeterminate"


@dataclass
class Request:
    seq: int
    key: str
    sent_at: float
    outcome: str = ""
    status_code: int | None = None
    task_id: str | None = None
    latency: float | None = None
    detail: str = ""


class Load:
    """Submits `rate` tasks a second from a pool of senders until stopped."""

    def __init__(
        self,
        base_url: str,
        *,
        rate: float,
        senders: int = 16,
        sleep_ms: tuple[int, int] = (50, 300),
        keys: bool = True,
    ) -> None:
        self.base_url = base_url
        self.rate = rate
        # How long each task sleeps, drawn from this range; and whether each submission
        # carries an Idempotency-Key (the session path) or not (the group commit).
        self.sleep_ms = sleep_ms
        self.keys = keys
        self.run_id = uuid.uuid4().hex[:8]
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=base_url, timeout=5.0)
        self._pool = ThreadPoolExecutor(max_workers=senders, thread_name_prefix="chaos-send")
        self._pacer = threading.Thread(target=self._pace, name="chaos-pacer", daemon=True)

    def start(self) -> None:
        self._pacer.start()

    def stop(self) -> list[Request]:
        """Stop submitting, wait for requests in flight, and return the log."""
        self._stop.set()
        self._pacer.join(timeout=30)
        self._pool.shutdown(wait=True)
        self._client.close()
        return sorted(self.requests, key=lambda request: request.seq)

    def _pace(self) -> None:
        # A fixed schedule, not "sleep after each send": slow answers must not lower the rate.
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        seq = 0
        while not self._stop.is_set():
            self._pool.submit(self._send, seq)
            seq += 1
            next_at += interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def _send(self, seq: int) -> None:
        request = Request(seq=seq, key=f"chaos-{self.run_id}-{seq}", sent_at=time.time())
        body = {
            "type": TASK_TYPE,
            "payload": {"seq": seq, "sleep_ms": random.randint(*self.sleep_ms)},
        }
        headers = {"Idempotency-Key": request.key} if self.keys else {}
        started = time.monotonic()
        try:
            response = self._client.post("/api/v1/tasks", json=body, headers=headers)
        except httpx.ConnectError as exc:
            request.outcome, request.detail = REJECTED, f"connect: {exc}"
        except httpx.HTTPError as exc:
            request.outcome, request.detail = INDETERMINATE, f"{type(exc).__name__}: {exc}"
        else:
            request.status_code = response.status_code
            if response.status_code == 202:
                request.outcome, request.task_id = ACCEPTED, response.json()["id"]
            else:
                request.outcome, request.detail = REJECTED, response.text[:300]
        request.latency = time.monotonic() - started
        with self._lock:
            self.requests.append(request)
