"""The one place that renders errors as HTTP answers: the app's own (app.core.errors), FastAPI's
and Starlette's, the database's, and anything unexpected, all as `ErrorBody` JSON."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import AppError, error_body, error_schemas, field_errors

logger = logging.getLogger(__name__)


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


def _document_errors(app: FastAPI) -> None:
    """Add `error_schemas()` to the OpenAPI document FastAPI builds (and caches) on first use."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = FastAPI.openapi(app).setdefault("components", {})
            # In name order, as FastAPI writes its own.
            components["schemas"] = dict(
                sorted({**components.get("schemas", {}), **error_schemas()}.items())
            )
        return app.openapi_schema  # type: ignore[return-value]  # set by FastAPI.openapi

    # FastAPI's documented way to extend its document ("Extending OpenAPI").
    app.openapi = openapi  # type: ignore[method-assign]


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _body_error(exc: RequestValidationError) -> bool:
    return any(tuple(error.get("loc", ()))[:1] == ("body",) for error in exc.errors())


def install_error_handlers(app: FastAPI) -> None:
    _document_errors(app)

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
