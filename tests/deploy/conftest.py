"""The overlays rendered once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.support import K8S, OVERLAYS, Object, keda_overlay, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Object]]:
    """Every overlay, and production with the KEDA component, as the docs render them."""
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


@pytest.fixture(scope="session")
def rendered_keda(tmp_path_factory: pytest.TempPathFactory) -> list[Object]:
    overlay: Path = keda_overlay(tmp_path_factory.mktemp("keda"))
    return render(overlay)


@pytest.fixture(scope="session")
def production(rendered: dict[str, list[Object]]) -> list[Object]:
    return rendered["production"]


@pytest.fixture(scope="session")
def staging(rendered: dict[str, list[Object]]) -> list[Object]:
    return rendered["staging"]
