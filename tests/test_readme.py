"""The README documents every setting and the two quickstart commands the Makefile runs."""

from __future__ import annotations

import re

from app.core.config import ENV_PREFIX, Settings
from tests.support.stack import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    documented = set(re.findall(r"^\| `(TASKDOCK_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    expected = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    assert expected == documented


def test_quickstart_commands_are_make_targets() -> None:
    makefile = (ROOT / "Makefile").read_text()
    quickstart = README.split("## Quickstart", 1)[1].split("###", 1)[0]
    commands = re.findall(r"^make (\w+)", quickstart, flags=re.MULTILINE)
    assert commands == ["run", "test"]
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE)
