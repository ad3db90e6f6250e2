"""GET /api/v1/task-types: built once per registry version, rebuilt when a type is registered."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from app.tasks import registry
from app.tasks.registry import TaskContext, registry_version, task_type
from app.tasks.router import task_types_json


class LateInput(BaseModel):
    when: str


def test_the_answer_is_built_once_and_again_after_a_registration(
    embedded_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry is the process's: what this test registers goes when it ends.
    monkeypatch.setattr(registry, "_registry", dict(registry._registry))
    monkeypatch.setattr(registry, "_version", registry._version)

    first = embedded_client.get("/api/v1/task-types")
    second = embedded_client.get("/api/v1/task-types")

    assert first.status_code == 200, first.text
    assert second.content == first.content
    assert task_types_json(registry_version()) is task_types_json(registry_version())
    # The rate limit's headers, which the route's dependency sets, are still on the answer.
    assert "ratelimit-remaining" in second.headers
    assert first.headers["content-type"] == "application/json"

    @task_type("tests.registered_late", input=LateInput)
    def registered_late(data: LateInput, context: TaskContext) -> Any:
        """Registered after the first answer."""
        return None

    later = embedded_client.get("/api/v1/task-types")

    names = [item["name"] for item in later.json()]
    assert "tests.registered_late" in names
    assert "tests.registered_late" not in [item["name"] for item in first.json()]
    late = next(item for item in later.json() if item["name"] == "tests.registered_late")
    assert late["description"] == "Registered after the first answer."
    assert late["input_schema"]["required"] == ["when"]
