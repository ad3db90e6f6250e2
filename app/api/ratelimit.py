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

from app.api.deps import client_address
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
            # A slow Redis must not slow every request: give up on it quickly instead.
            options = {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}
        self.storage = storage_from_string(url, key_prefix="taskdock", **options)
        self.strategy = FixedWindowRateLimiter(self.storage)
        # While the shared storage is away, each process still limits on its own.
        self.fallback = FixedWindowRateLimiter(storage_from_string("memory://"))
        self._quiet_until = 0.0
        self.limits: dict[str, RateLimitItem] = {
            "submit": parse(settings.rate_limit_submit),
            "read": parse(settings.rate_limit_read),
            "auth_failures": parse(settings.rate_limit_auth_failures),
        }

    def hit(self, name: str, identity: str) -> dict[str, str]:
        """Count one request and return its RateLimit headers; RateLimited when over the limit."""
        item = self.limits[name]
        strategy = self.fallback if time.monotonic() < self._quiet_until else self.strategy
        try:
            allowed = strategy.hit(item, name, identity)
            stats = strategy.get_window_stats(item, name, identity)
        except Exception as exc:
            # Stop asking for a while, so a dead Redis costs requests nothing.
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            logger.warning(
                "rate limit storage unavailable; limiting per process", extra={"reason": str(exc)}
            )
            allowed = self.fallback.hit(item, name, identity)
            stats = self.fallback.get_window_stats(item, name, identity)
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
        identity = f"key:{principal.owner}" if principal.owner else f"ip:{client_address(request)}"
        response.headers.update(limiter.hit(name, identity))

    return check
