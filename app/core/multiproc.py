"""The multiprocess directory of prometheus-client, prepared before prometheus_client is imported.

prometheus-client picks its storage when it is first imported, so a process group's directory
must be in PROMETHEUS_MULTIPROC_DIR by then. This module must not import prometheus_client.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess_dir(base: Path, role: str) -> Path:
    """A new, empty directory for this process group; directories of dead groups are removed."""
    base.mkdir(parents=True, exist_ok=True)
    for old in base.glob("*-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    path = base / f"{role}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
