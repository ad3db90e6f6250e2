"""Rate limits per API key (per client IP when auth is off), shared by every API process.

Counting is the `limits` library's fixed window (its key and its expiry), kept in Redis when
the broker is Redis (or TASKDOCK_RATE_LIMIT_STORAGE_URL), in memory otherwise. The client IP is
uvicorn's view of it, which honours X-Forwarded-For only from TASKDOCK_FORWARDED_ALLOW_IPS, so
a client cannot pick its own address.

A Redis round trip per request would cost more than the request itself, so each process counts
in memory and tells Redis in chunks, in the background (`limits` has no such mode):

- Far from the limit, a hit is granted on the process's estimate (the shared count at its last
  exchange with Redis, plus its own hits since) and added to Redis with the next chunk: every
  CHUNK_SHARE of the limit, or after SYNC_SECONDS, whichever comes first.
- In the last EXACT_SHARE of the limit, and for limits of at most EXACT_BELOW a window, every
  hit waits for its own INCR, as `limits`' FixedWindowRateLimiter would: the limit holds.

So across P processes the limit can be exceeded by at most what the others granted and had not
yet told Redis: (P - 1) x a chunk, plus what reached them within SYNC_SECONDS. While Redis is
away each process goes on counting on its estimate and adds what it granted once Redis is back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, Storage
from limits.storage import storage_from_string

from app.core.config import Settings
from app.core.errors import AppError

logger = logging.getLogger(__name__)


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


QUIET_SECONDS = 5.0
SYNC_SECONDS = 0.2
CHUNK_SHARE = 0.01
EXACT_SHARE = 0.1
EXACT_BELOW = 50


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"
    message = "too many requests; retry after the time in Retry-After"


@dataclass
class _Window:
    """One key's fixed window as this process knows it."""

    end: float  # time.time() at which it ends; an estimate until the storage has said
    seen: int = 0  # the shared count at the last exchange with the storage
    pending: int = 0  # hits granted here that the storage has not been told of
    told_at: float = field(default_factory=time.monotonic)
    end_known: bool = False
    telling: bool = False

    @property
    def estimate(self) -> int:
        return self.seen + self.pending


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        url = storage_url(settings)
        self.storage = _async_storage(url)
        # In memory a hit costs no round trip: every hit is exact.
        self.shared = url != "memory://"
        self._quiet_until = 0.0
        self._windows: dict[str, _Window] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.limits: dict[str, RateLimitItem] = {
            "submit": parse(settings.rate_limit_submit),
            "read": parse(settings.rate_limit_read),
            "auth_failures": parse(settings.rate_limit_auth_failures),
        }

    async def hit(self, name: str, identity: str) -> dict[str, str]:
        """Count one request and return its RateLimit headers; RateLimited when over the limit."""
        item = self.limits[name]
        key = item.key_for(name, identity)
        window = self._window(key, item)
        if self._exact(item, window):
            count = await self._tell(key, item, window, extra=1)
        else:
            window.pending += 1
            count = window.estimate
            if window.pending >= _chunk(item) or time.monotonic() - window.told_at >= SYNC_SECONDS:
                self._tell_soon(key, item, window)
        remaining = max(0, item.amount - count)
        reset = max(0, math.ceil(window.end - time.time()))
        headers = {
            "RateLimit-Limit": str(item.amount),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(reset),
        }
        if count > item.amount:
            error = RateLimited(limit=str(item))
            error.headers = {**headers, "Retry-After": str(max(reset, 1))}
            raise error
        return headers

    @property
    def quiet(self) -> bool:
        """True while the storage was found away a moment ago: count on the estimate."""
        return time.monotonic() < self._quiet_until

    def _exact(self, item: RateLimitItem, window: _Window) -> bool:
        if self.quiet:
            return False
        if not self.shared or item.amount <= EXACT_BELOW:
            return True
        return window.estimate + 1 > item.amount * (1 - EXACT_SHARE)

    def _window(self, key: str, item: RateLimitItem) -> _Window:
        now = time.time()
        window = self._windows.get(key)
        if window is None or window.end <= now:
            if len(self._windows) > _MAX_WINDOWS:
                self._windows = {k: w for k, w in self._windows.items() if w.end > now}
            window = self._windows[key] = _Window(end=now + item.get_expiry())
        return window

    async def _tell(self, key: str, item: RateLimitItem, window: _Window, *, extra: int) -> int:
        """Add this process's untold hits (and `extra`) to the shared count; the count after."""
        amount, window.pending = window.pending + extra, 0
        try:
            count = await self.storage.incr(key, item.get_expiry(), amount=amount)
            # Concurrent INCRs may answer out of order: the shared count only grows.
            window.seen = max(window.seen, count)
            window.told_at = time.monotonic()
            # This hit's place: its own INCR's answer, plus hits granted here and not yet told
            # (taken now: others may change the window while the expiry is read below).
            place = count + window.pending
            if not window.end_known or count == amount:
                # A fixed window's end never moves once its first hit set the key's expiry.
                window.end, window.end_known = await self.storage.get_expiry(key), True
        except Exception as exc:
            # Stop asking for a while, so a dead Redis costs requests nothing; what was granted
            # meanwhile is told when it is back.
            window.pending += amount
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            logger.warning(
                "rate limit storage unavailable; limiting on this process's count",
                extra={"reason": str(exc)},
            )
            return window.estimate
        return place

    def _tell_soon(self, key: str, item: RateLimitItem, window: _Window) -> None:
        if window.telling or self.quiet:
            return
        window.telling = True

        async def tell() -> None:
            try:
                await self._tell(key, item, window, extra=0)
            finally:
                window.telling = False

        task = asyncio.get_running_loop().create_task(tell())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _chunk(item: RateLimitItem) -> int:
    return max(1, int(item.amount * CHUNK_SHARE))


# Keys seen by one process within a window; past this, ended windows are forgotten.
_MAX_WINDOWS = 10_000
