"""A task type's JSON Schema as form fields, and the submitted fields back as a payload."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FormField:
    name: str
    kind: str  # integer, number, boolean, string, json
    required: bool
    description: str
    default: Any
    minimum: float | None
    maximum: float | None

    @property
    def initial(self) -> str:
        """The default as the input shows it."""
        if self.default is None:
            return ""
        if self.kind == "json":
            return json.dumps(self.default)
        return str(self.default)


def _kind(spec: dict[str, Any]) -> str:
    kind = spec.get("type")
    if kind in ("integer", "number", "boolean", "string"):
        return str(kind)
    return "json"  # objects, arrays, unions: typed as JSON text


def fields_of(schema: dict[str, Any]) -> list[FormField]:
    required = set(schema.get("required", []))
    fields = []
    for name, spec in schema.get("properties", {}).items():
        kind = _kind(spec)
        fields.append(
            FormField(
                name=name,
                kind=kind,
                required=name in required,
                description=str(spec.get("description", "")),
                default=spec.get("default"),
                minimum=spec.get("minimum", spec.get("exclusiveMinimum")),
                maximum=spec.get("maximum", spec.get("exclusiveMaximum")),
            )
        )
    return fields


def _number(text: str, kind: str) -> Any:
    try:
        return int(text) if kind == "integer" else float(text)
    except ValueError:
        return text  # the type's validation names it at the field


def payload_of(fields: list[FormField], form: dict[str, str]) -> dict[str, Any]:
    """The payload the form describes; values are converted by kind, never trusted further:
    the type's input model validates them as it does an API submission."""
    payload: dict[str, Any] = {}
    for item in fields:
        key = f"payload.{item.name}"
        if item.kind == "boolean":
            payload[item.name] = form.get(key) == "on"
            continue
        text = form.get(key, "")
        if text == "" and not (item.required and item.kind == "string"):
            continue  # left out: the model's default applies, or it names the missing field
        if item.kind in ("integer", "number"):
            payload[item.name] = _number(text.strip(), item.kind)
        elif item.kind == "json":
            try:
                payload[item.name] = json.loads(text)
            except ValueError:
                payload[item.name] = text
        else:
            payload[item.name] = text
    return payload
