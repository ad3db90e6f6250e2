"""Heartbeat health checks that start fast, for container HEALTHCHECKs run every few seconds.

`python -m app.healthcheck worker|dispatcher` exits 0 while that loop's heartbeat file is fresh.
It reads only the environment and imports nothing heavy (importing the CLI costs ~0.6 s of CPU);
`taskdock worker-health` and `taskdock dispatcher-health` give the same answer.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

# Mirrors the defaults of Settings (a test keeps them equal).
DEFAULTS = {
    "worker": ("/tmp/taskdock-worker.heartbeat", 30.0),  # noqa: S108
    "dispatcher": ("/tmp/taskdock-dispatcher.heartbeat", 30.0),  # noqa: S108
}


def heartbeat_status(path: Path, max_age: float, what: str) -> tuple[bool, str]:
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"{what}: no heartbeat at {path}"
    if age > max_age:
        return False, f"{what}: heartbeat is {age:.0f}s old (limit {max_age:g}s)"
    return True, f"{what}: heartbeat {age:.1f}s ago"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in DEFAULTS:
        print("usage: python -m app.healthcheck worker|dispatcher", file=sys.stderr)
        return 2
    role = argv[0]
    default_path, default_age = DEFAULTS[role]
    prefix = f"TASKDOCK_{role.upper()}_HEARTBEAT"
    path = Path(os.environ.get(f"{prefix}_FILE", default_path))
    max_age = float(os.environ.get(f"{prefix}_MAX_AGE", default_age))
    healthy, message = heartbeat_status(path, max_age, role)
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
