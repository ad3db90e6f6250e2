"""One error hierarchy, one JSON shape, one place that renders it."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


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


def described(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


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


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _body_error(exc: RequestValidationError) -> bool:
    return any(tuple(error.get("loc", ()))[:1] == ("body",) for error in exc.errors())


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(
            status_code=exc.status_code,
            content=jsonable_encoder(error_body(code=exc.code, message=exc.message, **exc.details)),
            headers=exc.headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type")
        if content_type is not None and not _is_json(content_type) and _body_error(exc):
            # FastAPI reads a body as JSON only when it says it is; anything else reaches the
            # model as bytes and fails as "not an object", which names the wrong problem.
            return JSONResponse(
                status_code=415,
                content=error_body(
                    code="unsupported_media_type",
                    message=f"Content-Type must be application/json, not {content_type[:100]!r}",
                ),
            )
        return JSONResponse(
            status_code=422,
            content=jsonable_encoder(
                error_body(
                    code="validation_error",
                    message="request validation failed",
                    fields=field_errors(exc.errors()),
                )
            ),
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:
            # Close the connection so the server stops reading the rest of a huge body.
            headers["Connection"] = "close"
        return JSONResponse(
            status_code=exc.status_code,
            content=error_body(code=code, message=str(exc.detail)),
            headers=headers or None,
        )

    # The API's hottest statements run on psycopg directly (app.core.db.Statements): its own
    # exceptions mean the same as SQLAlchemy's wrappers of them.
    @app.exception_handler(DataError)
    @app.exception_handler(psycopg.DataError)
    async def _bad_data(_request: Request, exc: Exception) -> JSONResponse:
        # A value the database refuses (a NUL byte, an out-of-range number): the client's input.
        return JSONResponse(
            status_code=422,
            content=error_body(code="invalid_value", message="a value was refused by the database"),
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg.InterfaceError)
    async def _database_unavailable(_request: Request, exc: Exception) -> JSONResponse:
        logger.warning("database unavailable", extra={"reason": str(exc).splitlines()[0]})
        return JSONResponse(
            status_code=503,
            content=error_body(code="database_unavailable", message="the database is unavailable"),
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # The trace goes to the log, never to the client.
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            status_code=500, content=error_body(code="internal_error", message="internal error")
        )
