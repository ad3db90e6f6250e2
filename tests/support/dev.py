"""`taskdock dev` started as a user starts it: the console script, in a directory of theirs."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.services import free_port, wait_for
from tests.support.stack import Proc, base_env

# What `make run` runs: the console script, whose own folder (not the working directory) is
# first on sys.path. `python -m app.cli` would hide the import problems users hit.
TASKDOCK = Path(sys.executable).parent / "taskdock"


def user_env(**overrides: str) -> dict[str, str]:
    """A shell's environment: no TASKDOCK_* of the suite's, no PYTHONPATH to the checkout."""
    env = base_env(Path("/nonexistent"))
    for key in [key for key in env if key.startswith("TASKDOCK_")]:
        env.pop(key)
    env.pop("PYTHONPATH", None)
    env.update(overrides)
    return env


@contextmanager
def dev(workdir: Path, env: dict[str, str]) -> Iterator[tuple[Proc, str]]:
    """`taskdock dev` started in `workdir`; yields the process and the API's base URL."""
    port = env.get("TASKDOCK_API_PORT") or str(free_port())
    env = {**env, "TASKDOCK_API_PORT": port}
    proc = Proc(
        name="dev",
        args=["/bin/sh", "-c", f'cd "{workdir}" && exec "$@"', "sh", str(TASKDOCK), "dev"],
        env=env,
        log=workdir.parent / f"{workdir.name}-dev.log",
    )
    proc.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: ready(base) or not proc.alive(), timeout=90, what="taskdock dev to be ready"
        )
        assert proc.alive(), proc.output()[-4000:]
        yield proc, base
    finally:
        proc.stop(timeout=40)


def ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
