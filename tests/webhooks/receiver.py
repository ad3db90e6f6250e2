"""A real HTTP receiver on 127.0.0.1 that answers a script of statuses and keeps what it got."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


@dataclass
class Receiver:
    """Answers `statuses` in turn (the last one for ever after); `body` with each answer."""

    statuses: list[int]
    body: bytes = b"ok"
    delay: float = 0.0  # seconds before each answer
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self) -> int:
        with self.lock:
            index = min(len(self.received) - 1, len(self.statuses) - 1)
            return self.statuses[index]

    def wait_for(self, count: int, *, timeout: float) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= count:
                    return list(self.received)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.received)} of {count} webhooks arrived in {timeout} s")


@contextmanager
def receiving(
    statuses: list[int], *, body: bytes = b"ok", delay: float = 0.0
) -> Iterator[Receiver]:
    receiver = Receiver(statuses=statuses, body=body, delay=delay)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            data = self.rfile.read(length)
            with receiver.lock:
                receiver.received.append(
                    Received(
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        data,
                        time.monotonic(),
                    )
                )
            status = receiver.answer()
            time.sleep(receiver.delay)
            self.send_response(status)
            self.send_header("content-length", str(len(receiver.body)))
            self.end_headers()
            self.wfile.write(receiver.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/taskdock"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
