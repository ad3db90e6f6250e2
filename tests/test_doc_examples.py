"""The docs' curl examples run: every page's ```sh blocks, in order, against a live stack.

A ```sh block runs when it uses "$TASKDOCK_URL", or when its page says `<!-- examples: run -->`
(the `taskdock tasks` commands read the variable themselves). A page's blocks run as one script
(`set -euo pipefail`, so a failing `curl -fsS` fails the page) against PostgreSQL, Redis, a
worker, a dispatcher and an API with auth on, holding a key with every scope in
$TASKDOCK_API_KEY. Webhook receivers on this machine's loopback are allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import services
from tests.support.stack import ROOT, base_env, running_stack, taskdock

DOCS = ROOT / "docs"
_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


_RUN_ALL = "<!-- examples: run -->"


def examples(page: Path) -> list[str]:
    text = page.read_text()
    return [block for block in _BLOCK.findall(text) if _RUN_ALL in text or "$TASKDOCK_URL" in block]


PAGES = sorted(str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md") if examples(page))


def test_the_runner_finds_the_feature_pages() -> None:
    # A page whose fence is misspelt would silently drop out of the parametrized test below.
    assert len(PAGES) >= 1, "no docs page has runnable examples"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("page", PAGES)
def test_the_pages_curl_examples_run(page: str, tmp_path: Path) -> None:
    services.require_postgres()
    services.require_redis()
    script = "\n".join(["set -euo pipefail", *examples(DOCS / page)])
    with services.scratch_database() as url:
        env = base_env(
            tmp_path / "data",
            TASKDOCK_DATABASE_URL=url,
            TASKDOCK_BROKER_URL=services.REDIS_URL,
            TASKDOCK_AUTH_ENABLED="true",
            TASKDOCK_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
        )
        assert taskdock("migrate", env=env).returncode == 0
        created = taskdock(
            "keys", "create", "--name", "docs", "--scopes", "submit,read,admin", env=env
        )
        assert created.returncode == 0, created.stderr
        key = created.stdout.strip().splitlines()[-1]
        with running_stack(env, tmp_path / "logs") as stack:
            stack.worker(concurrency=2)
            stack.dispatcher()
            _, base = stack.api()
            run = subprocess.run(
                ["bash", "-c", script],
                env={
                    **env,
                    "TASKDOCK_URL": base,
                    "TASKDOCK_API_KEY": key,
                    # `taskdock` and `python` as installed beside this interpreter.
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                },
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert run.returncode == 0, (
                f"{page}: rc={run.returncode}\n--- stdout\n{run.stdout[-3000:]}\n"
                f"--- stderr\n{run.stderr[-3000:]}\n{stack.dump_logs()}"
            )
