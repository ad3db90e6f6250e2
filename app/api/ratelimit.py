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
from collections.abc import Awaitable, Callable

from fastapi import Request, Response
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string

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


def _async_storage(url: str) -> Storage:
    """The `limits` asyncio storage for a URL, so counting never blocks the event loop."""
    if url == "memory://":
        return MemoryStorage()
    options: dict[str, float | str] = {}
    if url.startswith("redis"):
        # A slow Redis must not slow every request: give up on it quickly instead.
        options = {
            "implementation": "redispy",
            "key_prefix": "taskdock",
            "socket_connect_timeout": 0.25,
            "socket_timeout": 0.25,
        }
    storage = storage_from_string(f"async+{url}", **options)
    if not isinstance(storage, Storage):
        raise ValueError(f"no asyncio rate-limit storage for {url!r}")
    return storage


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        self.storage = _async_storage(storage_url(settings))
        # While the shared storage is away, each process still limits on its own.
        self.fallback: Storage = MemoryStorage()
        self._quiet_until = 0.0
        self._windows = _WindowEnds()
        self.limits: dict[str, RateLimitItem] = {
            "submit": parse(settings.rate_limit_submit),
            "read": parse(settings.rate_limit_read),
            "auth_failures": parse(settings.rate_limit_auth_failures),
        }

    async def hit(self, name: str, identity: str) -> dict[str, str]:
        """Count one request and return its RateLimit headers; RateLimited when over the limit."""
        item = self.limits[name]
        storage = self.fallback if time.monotonic() < self._quiet_until else self.storage
        try:
            count, reset_time = await self._windows.count(storage, item, name, identity)
        except Exception as exc:
            # Stop asking for a while, so a dead Redis costs requests nothing.
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            logger.warning(
                "rate limit storage unavailable; limiting per process", extra={"reason": str(exc)}
            )
            count, reset_time = await self._windows.count(self.fallback, item, name, identity)
        allowed = count <= item.amount
        remaining = max(0, item.amount - count)
        reset = max(0, math.ceil(reset_time - time.time()))
        headers = {
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset),
        }
        if not allowed:
            error = RateLimited(limit=str(item))
            error.headers = {**headers, "Retry-After": str(max(reset, 1))}
            raise error
        return headers


class _WindowEnds:
    """When each fixed window ends, learnt once per window instead of asked on every request.

    A fixed window's end never moves once its first hit set the key's expiry, so one TTL read
    per key and window is enough: most requests cost a single Redis round trip (the INCR).
    """

    def __init__(self) -> None:
        self._ends: dict[str, float] = {}

    async def count(
        self, storage: Storage, item: RateLimitItem, name: str, identity: str
    ) -> tuple[int, float]:
        """The count after this hit and the window's end: what `limits`' FixedWindowRateLimiter
        does on hit() (same key, same expiry), keeping the count it returns."""
        key = item.key_for(name, identity)
        count = await storage.incr(key, item.get_expiry())
        now = time.time()
        end = self._ends.get(key, 0.0)
        if count == 1 or end <= now:
            end = await storage.get_expiry(key)
            if len(self._ends) > _MAX_WINDOWS:
                self._ends = {k: v for k, v in self._ends.items() if v > now}
            self._ends[key] = end
        return count, end


# Keys seen by one process within a window; past this, ended windows are forgotten.
_MAX_WINDOWS = 10_000


def rate_limit(name: str) -> Callable[..., Awaitable[None]]:
    async def check(request: Request, response: Response, principal: PrincipalDep) -> None:
        limiter: RateLimiter = request.app.state.rate_limiter
        identity = f"key:{principal.owner}" if principal.owner else f"ip:{client_address(request)}"
        response.headers.update(await limiter.hit(name, identity))

    return check
