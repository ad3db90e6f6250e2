"""The multiprocess directory of prometheus-client, set before any metric of ours exists.

prometheus-client picks its storage (values.ValueClass) when it is first imported, from
PROMETHEUS_MULTIPROC_DIR. Something may import it before us: Celery loads every installed
`celery.commands` plugin (Flower's imports prometheus_client) before it imports `-A app.worker`
(app/worker/celery.py). So setting the directory also makes an already imported prometheus-client
switch to it.
This module never imports prometheus_client itself.
"""

from __future__ import annotations

import os
import shutil
import sys
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
    _reselect_value_class()
    return path


def _reselect_value_class() -> None:
    """Make an already imported prometheus-client store new metrics in the directory just set.

    prometheus-client reads PROMETHEUS_MULTIPROC_DIR only at import and offers no other way to
    choose multiprocess mode (prometheus/client_python#886, a duplicate of #701), so this sets
    the module attribute its import would have set. Metrics look the class up each time they
    create a value, so every metric created from now on writes to the directory. A metric
    created before (by the importer, e.g. Flower's own) keeps its in-process value: it was never
    one of ours, and our metrics module is imported only after this.
    """
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
