"""Liveness and readiness. Every dependency check is bounded; a dead one reads `false`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from app.core.db import get_engine, ping

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

# Checks run here, never on the event loop; a hung check holds a thread, not the server.
_executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="health")


def check_database() -> None:
    ping(get_engine())


def broker_check(app: Celery, timeout: float) -> Callable[[], None]:
    # The embedded broker is a folder: one that was deleted answers nothing until it is made
    # again (app.core.fsbroker does, at the next poll or publish).
    folder = (app.conf.broker_transport_options or {}).get("data_folder_in")

    def check() -> None:
        if folder is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"the broker folder {folder} is gone")
        with app.connection_for_read() as connection:
            connection.ensure_connection(max_retries=0, timeout=max(1, int(timeout)))
            connection.default_channel  # noqa: B018 - opening a channel proves the broker answers

    return check


async def bounded(check: Callable[[], Any], limit: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(_executor, check), limit)
    except Exception as exc:
        logger.warning(
            "health check failed",
            extra={"check": getattr(check, "__name__", "check"), "reason": repr(exc)[:200]},
        )
        return False
    return True


class HealthReport(BaseModel):
    """`db` and the broker's check (`redis`, `rabbitmq` or `broker`), each true or false."""

    model_config = ConfigDict(extra="allow")

    status: str
    db: bool


@router.get("/health/live", summary="The process serves requests")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/health/ready",
    summary="The database and the broker answer",
    response_model=HealthReport,
    responses={503: {"model": HealthReport, "description": "A dependency does not answer"}},
)
@router.get("/health", include_in_schema=False)
async def ready(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    timeout = settings.health_timeout
    db_ok, broker_ok = await asyncio.gather(
        bounded(check_database, timeout),
        bounded(broker_check(request.app.state.celery_app, timeout), timeout),
    )
    healthy = db_ok and broker_ok
    return JSONResponse(
        status_code=200 if healthy else 503,
        content={
            "status": "ok" if healthy else "unavailable",
            "db": db_ok,
            settings.broker_name: broker_ok,
        },
        headers={"Cache-Control": "no-store"},
    )
