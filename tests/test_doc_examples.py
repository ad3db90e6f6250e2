"""The docs' curl examples run: every page's ```sh blocks, in order, against a live stack.

A page's ```sh blocks run when one of them uses "$TASKDOCK_URL", or when the page says
`<!-- examples: run -->` (the `taskdock tasks` commands read the variable themselves). They run
as one script (`set -euo pipefail`, so a failing `curl -fsS` fails the page) against PostgreSQL,
Redis, a worker, a dispatcher and an API with auth on, holding a key with every scope in
$TASKDOCK_API_KEY. Webhook receivers on this machine's loopback are allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.stack import ROOT, live_system

DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


_RUN_ALL = "<!-- examples: run -->"


def examples(page: Path) -> list[str]:
    blocks: list[str] = _BLOCK.findall(page.read_text())
    # A block may set up what the next ones use (a receiver, a variable): a page runs whole.
    runs = _RUN_ALL in page.read_text() or any("$TASKDOCK_URL" in block for block in blocks)
    return blocks if runs else []


PAGES = sorted(str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md") if examples(page))


def test_the_runner_finds_the_feature_pages() -> None:
    # A page whose fence is misspelt would silently drop out of the parametrized test below.
    assert len(PAGES) >= 1, "no docs page has runnable examples"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("page", PAGES)
def test_the_pages_curl_examples_run(page: str, tmp_path: Path) -> None:
    script = "\n".join(["set -euo pipefail", *examples(DOCS / page)])
    with live_system(tmp_path, TASKDOCK_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8") as live:
        run = subprocess.run(
            ["bash", "-c", script],
            env={
                **live.env,
                "TASKDOCK_URL": live.base,
                "TASKDOCK_API_KEY": live.new_key("submit,read,admin"),
                # `taskdock` and `python` as installed beside this interpreter.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{live.env.get('PATH', '')}",
            },
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert run.returncode == 0, (
            f"{page}: rc={run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n"
            f"--- stderr\n{run.stderr[-3000:]}\n{live.stack.dump_logs()}"
        )
