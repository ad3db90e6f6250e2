"""prometheus-client's multiprocess directory, whatever imported prometheus_client first."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tests.support.stack import ROOT

COUNT_ONE = """
import sys
from pathlib import Path
{first}
from app.core.multiproc import prepare_multiprocess_dir

directory = prepare_multiprocess_dir(Path(sys.argv[1]), "worker")
assert ("prometheus_client" in sys.modules) == {expect_imported}
from prometheus_client import CollectorRegistry, Counter, generate_latest, multiprocess

Counter("probe_total", "A probe.", ["kind"]).labels("one").inc()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=str(directory))
print(generate_latest(registry).decode())
"""


def count_one(tmp_path: Path, first: str, expect_imported: bool) -> str:
    script = COUNT_ONE.format(first=first, expect_imported=expect_imported)
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "metrics")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_prometheus_client_imported_first_still_counts_in_the_directory(tmp_path: Path) -> None:
    # What `celery` does when Flower is installed: its plugin imports prometheus_client before
    # Celery imports `-A app.worker`, which sets the directory.
    output = count_one(tmp_path, "import prometheus_client", expect_imported=True)

    assert 'probe_total{kind="one"} 1.0' in output


def test_setting_the_directory_does_not_import_prometheus_client(tmp_path: Path) -> None:
    output = count_one(tmp_path, "", expect_imported=False)

    assert 'probe_total{kind="one"} 1.0' in output


def test_flower_is_installed_as_a_celery_command() -> None:
    # So every worker started through Celery's command line in the tests (the metrics tests
    # among them) runs with Flower's plugin loaded first, as a user who installed it would.
    assert "flower" in {entry.name for entry in entry_points(group="celery.commands")}
