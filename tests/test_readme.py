"""The README: the two quickstart commands the Makefile runs, and links that all lead somewhere."""

from __future__ import annotations

import re
import subprocess
import uuid
from pathlib import Path

import pytest

from scripts.gen_docs import slug
from tests.support.dev import TASKDOCK, dev, user_env
from tests.support.stack import ROOT

README = (ROOT / "README.md").read_text()
# [text](target): relative targets only; web addresses are not checked here.
LINK = re.compile(r"\]\((?!https?://|mailto:)([^)\s]+)\)")
HEADING = re.compile(r"^#+ (.+)$", flags=re.MULTILINE)


def test_quickstart_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    quickstart = README.split("## Quickstart", 1)[1].split("###", 1)[0]
    commands = re.findall(r"^make (\w+)", quickstart, flags=re.MULTILINE)
    assert commands == ["run", "test"]
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)


def test_every_link_leads_to_a_file_and_heading_that_exist() -> None:
    links = LINK.findall(README)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.is_file(), f"README.md links to {path}, which does not exist"
        if anchor:
            headings = {slug(heading) for heading in HEADING.findall(target.read_text())}
            assert anchor in headings, f"README.md links to {link}: no such heading"


def walkthrough() -> str:
    section = README.split("### A five-minute walkthrough", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return str(block)


@pytest.mark.slow
def test_the_walkthrough_runs_as_written(tmp_path: Path) -> None:
    """Every command of the README's walkthrough, against `make run`'s `taskdock dev`."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = user_env()
    with dev(workdir, env) as (proc, base):
        # The README's port and CLI path, pointed at this run's.
        script = walkthrough().replace("localhost:8000", base.removeprefix("http://"))
        script = script.replace(".venv/bin/taskdock", str(TASKDOCK))
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=workdir,
            env={**env, "TASKDOCK_API_PORT": base.rsplit(":", 1)[1]},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    output = result.stdout
    assert result.returncode == 0, result.stderr + output + proc.output()[-3000:]
    task_id = output.splitlines()[0]
    assert uuid.UUID(task_id)
    assert f'"id":"{task_id}"' in output
    assert '"code":"validation_error"' in output
    assert '"loc":["body","payload","user_id"]' in output
    assert "HTTP/1.1 200 OK" in output
    assert '"status":"CANCELLED"' in output
    assert '"attempt":2' in output
    assert "queues (waiting and due" in output
