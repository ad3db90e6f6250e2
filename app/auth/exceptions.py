"""Errors of the auth domain."""

from __future__ import annotations

from typing import Any

from app.core.errors import AppError


class NotAuthenticated(AppError):
    status_code = 401
    code = "not_authenticated"
    message = "a valid API key is required: Authorization: Bearer <key>"

    def __init__(self, message: str | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.headers = {"WWW-Authenticate": "Bearer"}


class MissingScope(AppError):
    status_code = 403
    code = "missing_scope"
    message = "this API key lacks the scope this operation needs"


class ApiKeyNotFound(AppError):
    status_code = 404
    code = "api_key_not_found"
    message = "no such API key"
