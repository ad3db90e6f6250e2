"""The docs site agrees with the code: generated references, the tests it names, the alerts."""

from __future__ import annotations

import re

import pytest
import yaml

from app.core.config import ENV_PREFIX, Settings
from scripts import gen_docs
from tests.support.stack import ROOT

DOCS = ROOT / "docs"


@pytest.mark.parametrize("page", sorted(gen_docs.PAGES))
def test_generated_reference_matches_the_code(page: str) -> None:
    committed = (gen_docs.REFERENCE / page).read_text()
    assert committed == gen_docs.PAGES[page](), (
        f"docs/reference/{page} differs from the code: run `make docs-gen` and commit it"
    )


def test_every_setting_is_documented_with_a_description() -> None:
    page = (gen_docs.REFERENCE / "settings.md").read_text()
    documented = set(re.findall(r"^\| `(TASKDOCK_[A-Z_]+)` \|", page, flags=re.MULTILINE))
    assert documented == {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    undescribed = [name for name, field in Settings.model_fields.items() if not field.description]
    assert undescribed == [], "give these Settings fields a docstring on the line below them"


def test_every_cli_command_is_documented() -> None:
    import typer

    from app.cli import cli

    page = (gen_docs.REFERENCE / "cli.md").read_text()
    root = typer.main.get_command(cli)
    for name in getattr(root, "commands", {}):
        assert f"## `taskdock {name}`" in page, name


def test_every_test_the_docs_name_exists() -> None:
    named = {
        (path, name)
        for page in DOCS.rglob("*.md")
        for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", page.read_text())
    }
    assert len(named) > 20
    for path, name in sorted(named):
        source = ROOT / path
        assert source.is_file(), path
        assert re.search(rf"^(async )?def {name}\(", source.read_text(), flags=re.M), (
            f"{path}::{name} is named in docs/ but does not exist"
        )


def test_every_alert_is_in_the_metrics_page() -> None:
    rules = yaml.safe_load((ROOT / "deploy/monitoring/rules/taskdock.yml").read_text())
    alerts = {
        rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    }
    page = (DOCS / "operate" / "metrics.md").read_text()
    listed = set(re.findall(r"^\| (Taskdock\w+) \|", page, flags=re.MULTILINE))
    assert alerts == listed


def test_every_page_is_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    in_nav = set(re.findall(r":\s+([\w/-]+\.md)$", nav, flags=re.MULTILINE))
    pages = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert pages == in_nav
