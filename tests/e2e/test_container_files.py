"""Checks of the container files that need no Docker engine (they run with the unit tests)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
PRODUCTION = ROOT / "deploy" / "production.yml"
APP_SERVICES = ("api", "worker", "dispatcher", "migrate")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    return result


def stages(text: str) -> dict[str, dict[str, Any]]:
    """Each stage by name (or index): its FROM and its own instructions, in order."""
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for keyword, arguments in instructions(text):
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(found))
            current = {"from": words[0], "steps": []}
            found[name] = current
        elif current is not None:
            current["steps"].append((keyword, arguments))
    return found


def effective_user(all_stages: dict[str, dict[str, Any]], name: str) -> str | None:
    """The USER a stage runs as, following `FROM <earlier stage>` chains."""
    stage = all_stages[name]
    users: list[str] = [arguments for keyword, arguments in stage["steps"] if keyword == "USER"]
    if users:
        return users[-1]
    parent: str = stage["from"]
    return effective_user(all_stages, parent) if parent in all_stages else None


def test_final_and_runtime_stages_run_as_a_numeric_non_root_user() -> None:
    all_stages = stages(DOCKERFILE.read_text())
    final = list(all_stages)[-1]
    for name in {final, "runtime"}:
        user = effective_user(all_stages, name)
        assert user is not None, f"stage {name} sets no USER (it would run as root)"
        uid, _, gid = user.partition(":")
        # Kubernetes' runAsNonRoot can only verify a numeric user.
        assert uid.isdigit(), f"stage {name}: USER {user} is not numeric"
        assert int(uid) != 0, f"stage {name} runs as root"
        assert gid == "" or (gid.isdigit() and int(gid) != 0), f"stage {name}: group {gid}"


def test_runtime_stage_uses_exec_form_and_a_python_healthcheck() -> None:
    steps = dict(stages(DOCKERFILE.read_text())["runtime"]["steps"])
    for keyword in ("ENTRYPOINT", "CMD"):
        assert isinstance(json.loads(steps[keyword]), list), f"{keyword} must be exec form"
    assert "python3" in steps["HEALTHCHECK"]
    assert "/health/live" in steps["HEALTHCHECK"]


def test_base_image_is_a_pinned_build_argument() -> None:
    text = DOCKERFILE.read_text()
    match = re.search(r"^ARG BASE_IMAGE=python:3\.11\.(\d+)-slim-bookworm$", text, re.MULTILINE)
    assert match, "BASE_IMAGE must default to a pinned python:3.11.<patch>-slim-bookworm"


def test_dockerignore_is_an_allow_list_of_existing_paths() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert not [path for path in allowed if path.startswith(("tests", ".git", ".venv"))]
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert any(source.rstrip("/") == path for path in allowed), f"{source} not in context"


def test_nginx_body_limit_matches_the_api() -> None:
    from app.core.config import Settings

    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    assert re.search(r"^\s*client_max_body_size 1m;", nginx, re.MULTILINE)
    env = (ROOT / "deploy" / "taskdock.env").read_text()
    assert "TASKDOCK_MAX_BODY_BYTES=1048576" in env.splitlines()
    assert Settings.model_fields["max_body_bytes"].default == 1024 * 1024


def test_compose_images_are_variables_with_official_defaults() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    expected = {
        "db": "${POSTGRES_IMAGE:-postgres:",
        "redis": "${REDIS_IMAGE:-redis:",
        "nginx": "${NGINX_IMAGE:-nginx:",
        "api": "${TASKDOCK_IMAGE:-",
    }
    for name, prefix in expected.items():
        assert services[name]["image"].startswith(prefix), name


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        if name == "migrate":
            assert service["restart"] == "no"
            continue
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        assert service.get("restart") in ("always", "unless-stopped"), name
    # The consumer-loop heartbeat, never `celery inspect ping` (celery/celery#8082).
    assert services["worker"]["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "app.healthcheck",
        "worker",
    ]
    assert services["dispatcher"]["healthcheck"]["test"] == [
        "CMD",
        "python",
        "-m",
        "app.healthcheck",
        "dispatcher",
    ]
    assert "noeviction" in " ".join(services["redis"]["command"])


def test_production_overlay_hardens_and_publishes_no_data_ports() -> None:
    base = yaml.safe_load(COMPOSE.read_text())["services"]
    production = yaml.safe_load(PRODUCTION.read_text())["services"]
    for name in APP_SERVICES:
        service = production[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert service["init"] is True, name
        assert any(mount.startswith("/tmp") for mount in service["tmpfs"]), name
        assert "mem_limit" in service, name
        assert "pids_limit" in service, name
    for name in ("db", "redis"):
        assert "ports" not in base[name], name
        assert "ports" not in production[name], name
    everything = COMPOSE.read_text() + PRODUCTION.read_text()
    assert "docker.sock" not in everything
    stop_grace = int(production["worker"]["stop_grace_period"].rstrip("s"))
    assert stop_grace > longest_run(), "a warm shutdown would cut the longest task short"


def longest_run() -> float:
    """The longest a run can take: the largest time limit of any task type, plus the hard grace."""
    from app.core.celery import max_time_limit
    from app.core.config import Settings
    from app.tasks.registry import load_task_modules

    load_task_modules([])
    settings = Settings()
    return max_time_limit(settings) + settings.task_hard_limit_grace


def test_flower_runs_only_with_its_profile_behind_nginx_and_a_password() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    flower = services["flower"]
    assert flower["profiles"] == ["flower"]
    assert "ports" not in flower  # reached through nginx only
    assert "edge" in flower["networks"]
    assert flower["build"]["target"] == "flower"
    script = " ".join(flower["command"])
    assert 'FLOWER_BASIC_AUTH="flower:$$(cat /run/secrets/flower_password)"' in script
    assert "--url_prefix=flower" in script
    assert "flower_password" in flower["secrets"]
    assert "flower_password" in (ROOT / "scripts" / "make-secrets.sh").read_text()
    assert "flower" in yaml.safe_load(PRODUCTION.read_text())["services"]
    # Events for it are a setting of every role, off unless asked.
    assert "--task-events" not in services["worker"]["command"]
    env = (ROOT / "deploy" / "taskdock.env").read_text().splitlines()
    assert "TASKDOCK_WORKER_EVENTS=false" in env

    # nginx resolves Flower per request, so it starts (and answers 502) without the profile.
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    location = re.search(r"location /flower/ \{(.*?)\n        \}", nginx, re.DOTALL)
    assert location is not None
    assert "resolver 127.0.0.11" in location.group(1)
    assert "set $flower_upstream http://flower:5555;" in location.group(1)
    assert "proxy_pass $flower_upstream;" in location.group(1)

    # Flower is in its own image stage, never in the application's dependencies.
    all_stages = stages(DOCKERFILE.read_text())
    assert all_stages["flower"]["from"] == "runtime"
    assert effective_user(all_stages, "flower") == "1001:1001"
    assert not re.search(r"^flower==", (ROOT / "requirements.lock").read_text(), re.MULTILINE)
    assert re.search(r"^flower==", (ROOT / "requirements-dev.lock").read_text(), re.MULTILINE)
