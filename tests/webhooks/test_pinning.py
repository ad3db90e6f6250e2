"""A delivery is sent to the address the guard checked, and TLS still verifies the URL's name:
pinning the connection costs HTTPS nothing. A real TLS server on 127.0.0.1 with a certificate
for hooks.test (made with openssl), which no DNS knows."""

from __future__ import annotations

import ipaddress
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from app.webhooks.delivery import Claimed, send_to
from app.webhooks.guard import Target

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # a test secret: 24 bytes, base64


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path, list[dict[str, str]]]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=hooks.test", "-addext", "subjectAltName=DNS:hooks.test",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            seen.append({**{k.lower(): v for k, v in self.headers.items()}, "body": body.decode()})
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], cert, seen
    finally:
        server.shutdown()
        server.server_close()


def claimed(url: str) -> Claimed:
    return Claimed(
        id=uuid.uuid4(),
        url=url,
        payload={"type": "task.succeeded", "data": {"id": "x"}},
        owner="",
        created_at=datetime.now(UTC),
        attempts=1,
    )


def test_https_is_pinned_to_the_checked_address_and_verifies_the_name(
    tls_server: tuple[int, Path, list[dict[str, str]]],
) -> None:
    port, cert, seen = tls_server
    loopback = ipaddress.ip_address("127.0.0.1")
    with httpx.Client(verify=ssl.create_default_context(cafile=cert), trust_env=False) as client:
        # hooks.test resolves nowhere: the connection can only have gone to the pinned address.
        sent = claimed(f"https://hooks.test:{port}/in?x=1")
        outcome = send_to(
            client, Target("https", "hooks.test", port, loopback), sent, secret=SECRET
        )
        assert outcome.delivered, outcome
        assert outcome.status_code == 204
        assert len(seen) == 1
        assert seen[0]["host"] == f"hooks.test:{port}"
        headers = {k: v for k, v in seen[0].items() if k != "body"}
        assert Webhook(SECRET).verify(seen[0]["body"], headers)["type"] == "task.succeeded"

        # A name the certificate does not hold is refused by TLS, pinned or not.
        wrong = claimed(f"https://other.test:{port}/in")
        outcome = send_to(
            client, Target("https", "other.test", port, loopback), wrong, secret=SECRET
        )
        assert not outcome.delivered
        assert outcome.status_code is None
        assert "ConnectError" in (outcome.error or "")
        assert len(seen) == 1
