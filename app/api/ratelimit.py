"""Rate limits per API key (per client IP when auth is off), shared by every API process.

Counting is the `limits` library's fixed window, kept in Redis when the broker is Redis (or
TASKDOCK_RATE_LIMIT_STORAGE_URL), in memory otherwise. The client IP is uvicorn's view of it,
which honours X-Forwarded-For only from TASKDOCK_FORWARDED_ALLOW_IPS, so a client cannot pick
its own address.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from app.auth.dependencies import PrincipalDep
from app.core.config import Settings
from app.core.errors import AppError

logger = logging.getLogger(__name__)


QUIET_SECONDS = 5.0


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"
    message = "too many requests; retry after the time in Retry-After"


def storage_url(settings: Settings) -> str:
    if settings.rate_limit_storage_url:
        return settings.rate_limit_storage_url
    if settings.broker_name == "redis":
        return settings.celery_broker_url
    return "memory://"


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        url = storage_url(settings)
        options: dict[str, Any] = {}
        if url.startswith("redis"):
            # A slow Redis must not slow every request: fail open quickly instead.
            options = {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}
        self.storage = storage_from_string(url, key_prefix="taskdock", **options)
        self.strategy = FixedWindowRateLimiter(self.storage)
        self._quiet_until = 0.0
        self.limits: dict[str, RateLimitItem] = {
            "submit": parse(settings.rate_limit_submit),
            "read": parse(settings.rate_limit_read),
        }

    def hit(self, name: str, identity: str) -> dict[str, str] | None:
        """Count one request; the RateLimit headers, or None when the storage is unreachable."""
        if time.monotonic() < self._quiet_until:
            return None
        item = self.limits[name]
        try:
            allowed = self.strategy.hit(item, name, identity)
            stats = self.strategy.get_window_stats(item, name, identity)
        except Exception as exc:
            # Fail open, and stop asking for a while so a dead Redis costs requests nothing.
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            logger.warning(
                "rate limit storage unavailable; not limiting", extra={"reason": str(exc)}
            )
            return None
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        headers = {
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(stats.remaining),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            error = RateLimited(limit=str(item))
            error.headers = {**headers, "Retry-After": str(max(reset, 1))}
            raise error
        return headers


def rate_limit(name: str) -> Callable[..., None]:
    def check(request: Request, response: Response, principal: PrincipalDep) -> None:
        limiter: RateLimiter = request.app.state.rate_limiter
        client = request.client.host if request.client else "unknown"
        identity = f"key:{principal.owner}" if principal.owner else f"ip:{client}"
        headers = limiter.hit(name, identity)
        if headers:
            response.headers.update(headers)

    return check
