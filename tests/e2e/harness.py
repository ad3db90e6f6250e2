"""The end-to-end harness: a Docker engine, the images, and the compose stack behind nginx."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
E2E = ROOT / "tests" / "e2e"
RESULTS = E2E / "results"
CI = os.environ.get("CI", "").lower() == "true"

BASE_IMAGE = os.environ.get("TASKDOCK_E2E_BASE_IMAGE", "taskdock/base-python:3.11-bookworm")
APP_IMAGE = "taskdock:local"
FLOWER_IMAGE = "taskdock-flower:local"
STAND_INS = {
    "POSTGRES_IMAGE": "taskdock-e2e/postgres:local",
    "REDIS_IMAGE": "taskdock-e2e/redis:local",
    "NGINX_IMAGE": "taskdock-e2e/nginx:local",
}
COMPOSE_FILES = (
    ROOT / "deploy" / "docker-compose.yml",
    ROOT / "deploy" / "production.yml",
    E2E / "compose.e2e.yml",
)
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}

# Filled in as the run goes; written to results/last-run.json and printed at the end.
summary: dict[str, Any] = {}


def unavailable(reason: str) -> None:
    """Without Docker the e2e cannot run: a failure under CI, a skip on a laptop."""
    if CI:
        pytest.fail(f"{reason}; CI=true requires Docker for the end-to-end test", pytrace=False)
    pytest.skip(reason)


def run(
    args: Sequence[str],
    *,
    timeout: float = 600,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
) -> subprocess.CompletedProcess[str]:
    """Run a command, and on failure raise with its output (the part a reader needs)."""
    result = subprocess.run(
        list(args),
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise AssertionError(f"`{' '.join(args)}` exited {result.returncode}:\n{output}")
    return result


def wait_for(what: str, probe: Callable[[], Any], *, timeout: float, interval: float = 0.5) -> Any:
    """Poll until probe() returns something truthy; its value is returned."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        with suppress(httpx.HTTPError):
            last = probe()
            if last:
                return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} ({last!r})")
        time.sleep(interval)


# --- The Docker engine ------------------------------------------------------------------------


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return run(["docker", "info"], check=False, timeout=30).returncode == 0


def _compose_v2_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return run(["docker", "compose", "version"], check=False, timeout=30).returncode == 0


def _missing_packages() -> list[str]:
    missing = []
    if shutil.which("dockerd") is None:
        missing.append("docker.io")
    if not _compose_v2_available() and shutil.which("docker-compose") is None:
        missing.append("docker-compose")
    if shutil.which("debootstrap") is None:
        missing.append("debootstrap")
    return missing


def _install(packages: list[str]) -> None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        unavailable(f"missing {', '.join(packages)} and cannot install them (needs root and apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    run(["apt-get", "update", "-q"], env=env, timeout=600)
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=env,
        timeout=900,
    )
    summary["install_seconds"] = round(time.monotonic() - started, 1)
    summary["installed_packages"] = packages


@contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine that answers; started here (and stopped afterwards) only if none runs."""
    missing = _missing_packages()
    if missing:
        _install(missing)
    if _engine_answers():
        summary["dockerd"] = "already running"
        yield
        return
    if os.geteuid() != 0:
        unavailable("no Docker engine answers, and only root can start dockerd here")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = (RESULTS / "dockerd.log").open("ab")
    started = time.monotonic()
    process = subprocess.Popen(
        ["dockerd"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for("dockerd to answer", _engine_answers, timeout=60, interval=1)
        summary["dockerd"] = f"started by the test (pid {process.pid})"
        summary["dockerd_start_seconds"] = round(time.monotonic() - started, 1)
        yield
    finally:
        # Only the engine this test started, by its own process id.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


# --- Images -----------------------------------------------------------------------------------


def _pip_index_url() -> str | None:
    """The index this machine's pip uses, if it is not pip's default (read, never stored)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        result = run(
            [sys.executable, "-m", "pip", "config", "get", "global.index-url"],
            check=False,
            timeout=60,
        )
        url = result.stdout.strip() if result.returncode == 0 else None
    return url if url and url.startswith(("http://", "https://")) else None


def _context_size(build_output: str) -> str | None:
    # The legacy builder says "Sending build context to Docker daemon  52.22kB", BuildKit
    # "transferring context: 52.22kB".
    found = re.findall(
        r"(?:build context to Docker daemon|transferring context:)\s+([\d.]+\s*[kMG]?B)",
        build_output,
    )
    return found[-1].replace(" ", "") if found else None


def build_base_image() -> None:
    started = time.monotonic()
    result = run(["bash", "scripts/build-base-image.sh", "--tag", BASE_IMAGE], timeout=1200)
    summary["base_image"] = BASE_IMAGE
    summary["base_build_seconds"] = round(time.monotonic() - started, 1)
    summary["base_was_cached"] = "up to date" in result.stderr


def build_stand_ins() -> None:
    started = time.monotonic()
    for variable, tag in STAND_INS.items():
        name = variable.removesuffix("_IMAGE").lower()
        run(
            [
                "docker",
                "build",
                "--build-arg",
                f"BASE_IMAGE={BASE_IMAGE}",
                "-t",
                tag,
                str(E2E / "images" / name),
            ],
            timeout=900,
        )
    summary["stand_ins_build_seconds"] = round(time.monotonic() - started, 1)


def app_build_command(context: Path, tag: str, target: str = "runtime") -> list[str]:
    revision = run(["git", "rev-parse", "HEAD"], check=False).stdout.strip() or "unknown"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    command = [
        "docker",
        "build",
        "-f",
        str(ROOT / "docker" / "Dockerfile"),
        "--target",
        target,
        "--build-arg",
        f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg",
        f"VERSION={version}",
        "--build-arg",
        f"REVISION={revision}",
        "-t",
        tag,
    ]
    index = _pip_index_url()
    if index:
        command += ["--build-arg", f"PIP_INDEX_URL_BUILD={index}"]
    return [*command, str(context)]


def build_app_image() -> None:
    started = time.monotonic()
    result = run(app_build_command(ROOT, APP_IMAGE), timeout=1200)
    summary["image_build_seconds"] = round(time.monotonic() - started, 1)
    summary["context_size"] = _context_size(result.stdout + result.stderr)
    image = image_size(APP_IMAGE)
    base = image_size(BASE_IMAGE)
    sizes = run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "du",
            APP_IMAGE,
            "-sb",
            "/opt/venv",
            "/opt/taskdock",
        ]
    ).stdout.split()
    summary["image_size_mb"] = round(image / 1e6, 1)
    summary["base_size_mb"] = round(base / 1e6, 1)
    summary["added_on_base_mb"] = round((image - base) / 1e6, 1)
    summary["dependencies_mb"] = round(int(sizes[0]) / 1e6, 1)
    summary["app_code_kb"] = round(int(sizes[2]) / 1e3, 1)


def build_flower_image() -> None:
    """The `flower` stage: the application image plus Flower, for the compose profile."""
    started = time.monotonic()
    run(app_build_command(ROOT, FLOWER_IMAGE, target="flower"), timeout=1200)
    summary["flower_image_build_seconds"] = round(time.monotonic() - started, 1)


def image_size(tag: str) -> int:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).stdout)


def image_layers(tag: str) -> list[str]:
    output = run(["docker", "image", "inspect", "-f", "{{json .RootFS.Layers}}", tag]).stdout
    layers: list[str] = json.loads(output)
    return layers


def copy_build_context(destination: Path) -> None:
    """Copy what .dockerignore lets into the build context (it is an allow-list)."""
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if not line.startswith("!"):
            continue
        source = ROOT / line[1:].rstrip("/")
        target = destination / line[1:].rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.exists():
            shutil.copy2(source, target)
    shutil.copy2(ROOT / ".dockerignore", destination / ".dockerignore")


# --- The compose stack ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_secrets(directory: Path) -> None:
    """Random secrets for this run only, made by the script the docs give operators."""
    run(["bash", "scripts/make-secrets.sh", str(directory)])


@dataclass
class Stack:
    """The compose project under test, reached through nginx on a loopback port."""

    project: str
    port: int
    env: dict[str, str]
    compose_command: list[str]
    secrets_dir: Path
    api_key: str = ""
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def bootstrap_key(self) -> str:
        return (self.secrets_dir / "taskdock_bootstrap_api_key").read_text().strip()

    def client(self, timeout: float = 10) -> httpx.Client:
        """A client authenticated with the test's own submit+read key."""
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def create_api_key(self) -> None:
        """A least-privilege key made with the keys CLI inside a running API container."""
        api = self.containers("api")[0]["Name"].lstrip("/")
        command = ["taskdock", "keys", "create", "--name", "e2e", "--scopes", "submit,read"]
        result = run(["docker", "exec", api, *command])
        self.api_key = result.stdout.strip().splitlines()[-1]
        self.http.close()
        self.http = self.client()

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        command = [*self.compose_command, "-p", self.project]
        for path in COMPOSE_FILES:
            command += ["-f", str(path)]
        result = run([*command, *args], env=self.env, timeout=timeout, check=check)
        return result.stdout + result.stderr

    def containers(self, service: str | None = None) -> list[dict[str, Any]]:
        """Every container of the project (running or not), from Docker's own labels."""
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        ids = run(["docker", "ps", "-a", "-q", *filters]).stdout.split()
        if not ids:
            return []
        found: list[dict[str, Any]] = json.loads(run(["docker", "inspect", *ids]).stdout)
        return sorted(found, key=lambda c: c["Name"])

    def container_ids(self, service: str) -> list[str]:
        return [c["Id"] for c in self.containers(service)]

    def unhealthy(self) -> list[str]:
        """Names of containers not yet where they should be (healthy, or the migration done)."""
        waiting = []
        for container in self.containers():
            service = container["Config"]["Labels"]["com.docker.compose.service"]
            state = container["State"]
            if service == "migrate":
                if state["Status"] != "exited" or state["ExitCode"] != 0:
                    waiting.append(f"{container['Name']} ({state['Status']})")
            elif state.get("Health", {}).get("Status") != "healthy":
                waiting.append(f"{container['Name']} ({state.get('Health', {}).get('Status')})")
        return waiting

    def wait_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        wait_for(
            "every service to be healthy",
            lambda: not self.unhealthy() and len(self.containers()) > 0,
            timeout=timeout,
        )
        return time.monotonic() - started

    def submit(self, type_: str, payload: dict[str, Any], **headers: str) -> httpx.Response:
        body = {"type": type_, "payload": payload}
        return self.http.post("/api/v1/tasks", json=body, headers=headers)

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/v1/tasks/{task_id}")
        response.raise_for_status()
        record: dict[str, Any] = response.json()
        return record

    def wait_finished(self, task_ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Poll until every task is in a terminal state; return the final records."""
        pending = set(task_ids)
        done: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for task_id in list(pending):
                with suppress(httpx.HTTPError):
                    record = self.task(task_id)
                    if record["status"] in TERMINAL:
                        done[task_id] = record
                        pending.discard(task_id)
            if not pending:
                break
            if time.monotonic() >= deadline:
                statuses = {}
                for task_id in list(pending)[:5]:
                    with suppress(httpx.HTTPError):
                        statuses[task_id] = self.task(task_id)["status"]
                raise AssertionError(
                    f"{len(pending)} task(s) unfinished after {timeout:g}s, e.g. {statuses}"
                )
            time.sleep(0.5)
        return done

    def save_logs(self) -> None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        logs = self.compose("logs", "--no-color", "--timestamps", timeout=120, check=False)
        (RESULTS / "compose.log").write_text(logs)


def compose_command() -> list[str]:
    chosen = os.environ.get("TASKDOCK_E2E_COMPOSE")
    if chosen:
        return chosen.split()
    return ["docker", "compose"] if _compose_v2_available() else ["docker-compose"]


def compose_version(command: list[str]) -> str:
    output = run([*command, "version"], check=False).stdout.splitlines()
    return output[0].strip() if output else "unknown"


@contextmanager
def running_stack(secrets_dir: Path) -> Iterator[Stack]:
    """Bring the production stack up; always take it down again, volumes included."""
    write_secrets(secrets_dir)
    port = free_port()
    project = f"taskdock-e2e-{os.getpid()}"
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "TASKDOCK_IMAGE": APP_IMAGE,
        "TASKDOCK_FLOWER_IMAGE": FLOWER_IMAGE,
        "TASKDOCK_SECRETS_PATH": str(secrets_dir),
        "TASKDOCK_HTTP_PORT": str(port),
        **STAND_INS,
    }
    command = compose_command()
    stack = Stack(
        project=project, port=port, env=env, compose_command=command, secrets_dir=secrets_dir
    )
    summary["compose"] = compose_version(command)
    try:
        started = time.monotonic()
        stack.compose("up", "-d", "--no-build", timeout=300)
        # Generous here so the other checks still run; the 60 s target is asserted by a test.
        stack.wait_healthy(timeout=180)
        summary["start_to_healthy_seconds"] = round(time.monotonic() - started, 1)
        stack.create_api_key()
        yield stack
    finally:
        stack.http.close()
        with suppress(Exception):
            stack.save_logs()
        # -t 15: the worker's 330 s grace period is for real deployments, not for a teardown.
        stack.compose("down", "-v", "--remove-orphans", "-t", "15", timeout=300, check=False)


def write_summary() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "last-run.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
