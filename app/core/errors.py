"""One error hierarchy and one JSON shape; app/api/errors.py renders them. No web framework here:
the worker and the command line raise these too."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AppError(Exception):
    """Base of every error a client may see; services raise these, never HTTPException."""

    status_code = 500
    code = "internal_error"
    message = "internal error"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message
        self.details = details
        self.headers: dict[str, str] = {}


class NotFound(AppError):
    status_code = 404
    code = "not_found"
    message = "not found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"
    message = "conflict"


class InvalidInput(AppError):
    status_code = 422
    code = "validation_error"
    message = "request validation failed"


class ServiceUnavailable(AppError):
    status_code = 503
    code = "service_unavailable"
    message = "a dependency is unavailable; retry later"


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer: `code` and `message`, and only where they apply, `fields` and
    the named details below. Nothing else ever appears (tests hold every error to this)."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable, machine-readable: `task_not_found`, `quota_exceeded`…")
    message: str = Field(description="For people; may change between versions.")
    fields: list[FieldError] | None = Field(
        default=None, description="Validation errors: what is wrong, and where (`loc`)."
    )
    task_id: str | None = Field(
        default=None, description="The task concerned (404, or the task an Idempotency-Key names)."
    )
    status: str | None = Field(default=None, description="The task's status that forbids the move.")
    scope: str | None = Field(default=None, description="The scope the API key lacks.")
    key: str | None = Field(default=None, description="The API key asked for (admin routes).")
    limit: str | None = Field(default=None, description="The rate limit reached.")
    quota: int | None = Field(default=None, description="The unfinished-task quota reached.")


# Error answers name ErrorBody by reference, not as `model`: FastAPI builds a pydantic
# TypeAdapter for every `model` of every route (twice: once declared, once included), a
# hundred-odd here for one schema, which cost the API 40 ms of start-up and the memory they
# hold (docs/performance.md). `error_schemas` puts ErrorBody in the document once
# (app/api/errors.py).
_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def described(description: str) -> dict[str, Any]:
    return {"description": description, "content": _ERROR_CONTENT}


def error_schemas() -> dict[str, Any]:
    """ErrorBody and the models it uses, as OpenAPI components (the `described` answers)."""
    schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = schema.pop("$defs", {})
    components[ErrorBody.__name__] = schema
    for model in components.values():
        for field in model["properties"].values():
            # A detail that does not apply is left out of the answer (`error_body`), not null.
            if "default" in field and field["default"] is None:
                del field["default"]
    return components


# Answers any /api route may give; routes add their own (404, 409, 413).
COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: described("The body is not parseable (not JSON, not UTF-8)"),
    415: described("The body is not sent as `Content-Type: application/json`"),
    401: described("No valid API key"),
    403: described("The API key lacks the scope"),
    413: described("Request body too large"),
    422: described("Invalid input; `fields` names what is wrong"),
    429: described("Rate limit or quota reached; see Retry-After"),
    503: described("The database is unavailable"),
}


def error_body(
    *, code: str, message: str, fields: list[dict[str, Any]] | None = None, **details: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        body["fields"] = fields
    body.update(details)
    return body


def field_errors(errors: Any) -> list[dict[str, Any]]:
    """Pydantic errors without the echoed input, which may be large or sensitive."""
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]
