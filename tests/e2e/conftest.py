"""Session fixtures of the end-to-end test: engine, images, stack; and the closing summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e import harness


@pytest.fixture(scope="session")
def docker_ready() -> Iterator[None]:
    """Docker installed and answering; stopped at the end only if this run started it."""
    started = time.monotonic()
    try:
        with harness.docker_engine():
            yield
    finally:
        harness.summary["e2e_wall_seconds"] = round(time.monotonic() - started, 1)
        harness.write_summary()


@pytest.fixture(scope="session")
def images(docker_ready: None) -> None:
    """The local base, the test stand-ins and the application image, built as the docs say."""
    harness.build_base_image()
    harness.build_stand_ins()
    harness.build_app_image()


@pytest.fixture(scope="session")
def flower_image(images: None) -> None:
    harness.build_flower_image()


@pytest.fixture(scope="session")
def compose_stack(
    images: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.Stack]:
    secrets_dir: Path = tmp_path_factory.mktemp("secrets")
    with harness.running_stack(secrets_dir) as stack:
        yield stack


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not harness.summary:
        return
    terminalreporter.section("taskdock e2e summary")
    for key, value in sorted(harness.summary.items()):
        terminalreporter.write_line(f"{key:28} {value}")
    terminalreporter.write_line(f"(also in {harness.RESULTS / 'last-run.json'})")
