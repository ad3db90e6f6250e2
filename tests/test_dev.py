"""`taskdock dev` as a new user runs it: from the console script, in a project directory."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.support.dev import TASKDOCK, dev, user_env
from tests.support.services import free_port, wait_for
from tests.support.stack import ROOT

pytestmark = pytest.mark.slow

EXAMPLE = ROOT / "examples" / "myproject"


def wait_final(base: str, task_id: str, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    record: dict[str, object] = {}
    while time.monotonic() < deadline:
        record = httpx.get(f"{base}/api/v1/tasks/{task_id}", timeout=5).json()
        if record["status"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            return record
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} not finished: {record}")


def worker_metrics_url(output: str) -> str:
    found = re.search(r"worker metrics at (http://\S+/metrics)", output)
    assert found, output[-3000:]
    return found.group(1)


def test_documented_task_type_runs_from_the_project_directory(tmp_path: Path) -> None:
    """`TASKDOCK_TASK_MODULES=myproject.tasks make run` with the documented example (the very
    file docs/task-types.md shows), whose type has a queue of its own.

    Failed three ways before: `No module named 'myproject'` (the console script's folder, not
    the working directory, was on sys.path), TASKDOCK_API_PORT ignored by `dev`, and the
    worker consuming only `default`, so a task of the example's `images` queue never ran.
    """
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project / "myproject")
    env = user_env(TASKDOCK_TASK_MODULES="myproject.tasks", TASKDOCK_API_PORT=str(free_port()))

    with dev(project, env) as (proc, base):
        assert base.endswith(env["TASKDOCK_API_PORT"])
        response = httpx.post(
            f"{base}/api/v1/tasks",
            json={"type": "resize_image", "payload": {"image_id": 7, "width": 640}},
        )
        assert response.status_code == 202, response.text
        assert response.json()["queue"] == "images"
        record = wait_final(base, response.json()["id"])
        status = cli("status", "--workers", cwd=project, env=env)

    assert record["status"] == "SUCCEEDED", proc.output()[-4000:]
    assert record["result"] == {"url": "https://cdn.example/7-640.png"}
    assert (project / ".taskdock" / "taskdock.db").exists()
    assert status.returncode == 0, status.stderr
    images = next(line for line in status.stdout.splitlines() if line.strip().startswith("images"))
    assert "1 worker" in images, status.stdout
    assert "queues=default,images" in status.stdout


def test_two_instances_share_nothing_and_bind_loopback(tmp_path: Path) -> None:
    """Two checkouts on one machine: own ports, heartbeats and metrics, all on 127.0.0.1; a
    misspelt setting is named with its correct spelling by every process at start."""
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    env = user_env(TASKDOCK_DATABSE_URL="postgresql://nowhere/x")

    with dev(first, env) as (one, base_one), dev(second, env) as (two, base_two):
        assert base_one != base_two
        urls = [worker_metrics_url(one.output()), worker_metrics_url(two.output())]
        assert urls[0] != urls[1]
        for url in urls:
            assert url.startswith("http://127.0.0.1:")
            wait_for(lambda u=url: metrics_ok(u), timeout=30, what=f"worker metrics at {url}")
            port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
            assert listening_addresses(port) == {"127.0.0.1"}
        for workdir in (first, second):
            data = workdir / ".taskdock"
            wait_for(
                lambda d=data: (
                    (d / "worker.heartbeat").exists() and (d / "dispatcher.heartbeat").exists()
                ),
                timeout=30,
                what=f"heartbeats under {data}",
            )
            assert any((data / "metrics").iterdir())

    # dev itself, then its API, worker and dispatcher: each warns once at start.
    for proc in (one, two):
        warnings = proc.output().count(
            "unknown setting TASKDOCK_DATABSE_URL is ignored; did you mean TASKDOCK_DATABASE_URL?"
        )
        assert warnings >= 4, proc.output()[-4000:]


def metrics_ok(url: str) -> bool:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and "taskdock_processes" in response.text


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on `port` (from /proc/net/tcp)."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                addresses.add(_address(address))
    return addresses


def _address(hex_address: str) -> str:
    if len(hex_address) == 8:
        return ".".join(str(int(hex_address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    return "::" if set(hex_address) == {"0"} else hex_address


def test_deleting_the_data_directory_kills_nothing_and_loses_no_accepted_task(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    with dev(workdir, user_env()) as (proc, base):
        before = httpx.post(
            f"{base}/api/v1/tasks",
            json={"type": "process_data", "payload": {"user_id": 1, "data": "a"}},
        )
        assert before.status_code == 202
        assert wait_final(base, before.json()["id"])["status"] == "SUCCEEDED"

        shutil.rmtree(workdir / ".taskdock")

        wait_for(
            lambda: httpx.get(f"{base}/health/ready", timeout=2).status_code == 503,
            timeout=5,
            what="readiness to report the deleted data directory",
        )
        health = httpx.get(f"{base}/health/ready", timeout=2).json()
        assert health["db"] is False
        after = httpx.post(
            f"{base}/api/v1/tasks",
            json={"type": "process_data", "payload": {"user_id": 2, "data": "b"}},
        )
        # Never a 202 for a record written to a file that no longer exists.
        assert after.status_code == 503, after.text
        assert after.json()["code"] == "database_file_gone"
        # The worker polls the broker folder and makes it again.
        wait_for(
            lambda: (workdir / ".taskdock" / "broker" / "queue").is_dir(),
            timeout=10,
            what="the broker folders to come back",
        )
        time.sleep(3)
        assert proc.alive()
        output = proc.output()
        assert "exited with" not in output, output[-4000:]
        assert "FileNotFoundError" not in output, output[-4000:]
        assert "was deleted" in output
        assert httpx.get(f"{base}/health/live", timeout=2).status_code == 200
    assert proc.process is not None
    assert proc.process.returncode == 0, proc.output()[-4000:]


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr and no traceback."""
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def test_a_read_only_data_directory_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "readonly"
    data.mkdir()
    env = user_env(TASKDOCK_DATA_DIR=str(data))
    command = [str(TASKDOCK), "dev", "--port", str(free_port())]
    if shutil.which("unshare") and _can_unshare():
        # A read-only mount, as a read-only volume or disk would be (root ignores modes).
        command = [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount -t tmpfs -o ro tmpfs "{data}" && exec "$@"',
            "sh",
            *command,
        ]
        reason = "Read-only file system"
    else:
        data.chmod(0o500)
        reason = "Permission denied"
    result = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    line = one_line_failure(result)
    assert "TASKDOCK_DATA_DIR" in line
    assert str(data) in line
    assert reason in line


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10, check=False)
    return probe.returncode == 0


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The console script, as a user in `cwd` runs it."""
    return subprocess.run(
        [str(TASKDOCK), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_a_command_without_a_database_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    for command in (["status"], ["keys", "list"]):
        line = one_line_failure(cli(*command, cwd=tmp_path, env=user_env()))
        assert "taskdock migrate" in line
        assert str(tmp_path / ".taskdock" / "taskdock.db") in line
        assert not (tmp_path / ".taskdock").exists()


@pytest.mark.postgres
def test_a_command_on_an_unmigrated_postgres_is_one_line(tmp_path: Path) -> None:
    from tests.support.services import scratch_database

    with scratch_database() as url:
        result = cli("status", cwd=tmp_path, env=user_env(TASKDOCK_DATABASE_URL=url))
    line = one_line_failure(result)
    assert "revision none" in line
    assert "taskdock migrate" in line
    assert not (tmp_path / ".taskdock").exists()
