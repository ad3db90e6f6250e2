"""The docs' Kubernetes and CI/CD pages: their commands are the ones the tests run."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.deploy.support import K8S, OVERLAYS, ROOT, by_kind, missing, render
from tests.deploy.test_deploy_script import SELECTORS

PAGES = {"Deploy on Kubernetes": "docs/deploy/kubernetes.md", "CI/CD": "docs/deploy/ci-cd.md"}


def section(title: str) -> str:
    """The page that holds this part of the docs (it starts with the title as its heading)."""
    page = ROOT / PAGES[title]
    if not page.is_file():
        missing(f"{PAGES[title]} is missing")
    text = page.read_text()
    assert text.startswith(f"# {title}\n"), f"{PAGES[title]} is not the {title!r} page"
    return text


def commands(text: str) -> list[list[str]]:
    """The shell commands of the section's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    lines = (line.split(" #", 1)[0].strip() for line in joined.splitlines())
    return [shlex.split(line) for line in lines if line and not line.startswith("#")]


def test_docs_render_with_the_tested_command() -> None:
    renders = [
        c for c in commands(section("Deploy on Kubernetes")) if c[0] == "scripts/k8s-render.sh"
    ]
    assert renders
    for command in renders:
        args = command[1 : command.index(">")] if ">" in command else command[1:]
        overlay = ROOT / args[0]
        assert overlay.parent == K8S / "overlays"
        assert overlay.name in OVERLAYS
        assert by_kind(render(overlay, *args[1:]), "Deployment")


def test_docs_deploy_creates_the_secret_and_applies_the_shared_objects() -> None:
    lines = commands(section("Deploy on Kubernetes"))
    template = yaml.safe_load((K8S / "secret.template.yaml").read_text())
    (deploy,) = [c for c in lines if c[0] == "scripts/k8s-deploy.sh"]
    overlay = ROOT / deploy[1]
    assert overlay.parent == K8S / "overlays"
    assert overlay.name in OVERLAYS
    namespace = f"taskdock-{overlay.name}"
    (secret,) = [c for c in lines if c[:1] == ["kubectl"] and "generic" in c]
    assert secret[secret.index("-n") + 1] == namespace
    assert secret[secret.index("generic") + 1] == template["metadata"]["name"]
    files = {
        arg.split("=", 1)[1].rsplit("/", 1)[-1] for arg in secret if arg.startswith("--from-file=")
    }
    assert files == set(template["stringData"])
    applies = [c for c in lines if c[:2] == ["kubectl", "apply"]]
    assert applies
    for apply in applies:
        assert apply[apply.index("-l") + 1] == SELECTORS["shared"]


def test_docs_explain_ci_cd() -> None:
    text = section("CI/CD")
    for name in (
        "ci.yml",
        "release.yml",
        "deploy.yml",
        "dependabot.yml",
        ".pre-commit-config.yaml",
    ):
        assert name in text, name
    for word in ("required reviewers", "Roll back", "KUBECONFIG", "IMAGE_REGISTRY"):
        assert word in text, word


def test_make_k8s_check_runs_these_tests() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = re.search(r"^k8s-check:.*\n((?:\t.*\n)+)", makefile, flags=re.M)
    if target is None:
        missing("the Makefile has no k8s-check target")
    assert target is not None
    assert "pytest" in target.group(1)
    assert "tests/deploy" in target.group(1)


@pytest.mark.parametrize("title", ["Deploy on Kubernetes", "CI/CD"])
def test_docs_name_no_tool_hosts(title: str) -> None:
    # Registries and mirrors are configuration, never text in the repository.
    assert not re.search(
        r"\b(ghcr\.io|docker\.io|quay\.io|deb\.debian\.org|pypi\.org)\b", section(title)
    )
