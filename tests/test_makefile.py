"""The Makefile's README commands install what they need and no more."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.stack import ROOT


def dry_run(target: str, venv: Path, *args: str) -> str:
    """The commands `make TARGET` would run for a venv that does not exist yet."""
    # Not make's own variables of an outer `make test`: they would add "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS"}}
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_run_installs_the_runtime_lock_only(tmp_path: Path) -> None:
    commands = dry_run("run", tmp_path / "venv")

    assert "-r requirements.lock" in commands
    assert "requirements-dev.lock" not in commands
    assert commands.strip().splitlines()[-1].split() == [f"{tmp_path}/venv/bin/taskdock", "dev"]


def test_run_takes_a_port_and_host(tmp_path: Path) -> None:
    last = dry_run("run", tmp_path / "venv", "PORT=8001", "HOST=0.0.0.0").strip().splitlines()[-1]

    assert last.split()[1:] == ["dev", "--port", "8001", "--host", "0.0.0.0"]


def test_test_installs_the_dev_lock(tmp_path: Path) -> None:
    commands = dry_run("test", tmp_path / "venv")

    assert "-r requirements-dev.lock" in commands
    assert "pytest" in commands.strip().splitlines()[-1]
