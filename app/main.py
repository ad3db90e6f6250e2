"""The FastAPI application: `app.main:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from prometheus_client import CollectorRegistry

from app.api.deps import Database
from app.api.errors import install_error_handlers
from app.api.health import router as health_router
from app.api.metrics import StateCollector
from app.api.metrics import router as metrics_router
from app.api.middleware import Guard, RequestMiddleware
from app.api.ratelimit import RateLimiter
from app.api.router import include_api
from app.auth.service import KeyCache
from app.console.mount import mount as mount_console
from app.core import collector, metrics
from app.core.celery import create_celery_app
from app.core.config import Settings, get_settings, warn_unknown_variables
from app.core.db import configure
from app.core.logging import configure_logging
from app.tasks.events import EventHub
from app.tasks.publication import Publisher, Submitter
from app.tasks.registry import load_task_modules
from app.webhooks.metrics import DeliveryCollector

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    warn_unknown_variables()
    configure(settings, role="api")
    load_task_modules(settings.task_modules)
    celery_app = create_celery_app(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "api started",
            extra={"environment": settings.environment.value, "broker": settings.broker_name},
        )
        if not settings.auth_enabled:
            logger.warning("authentication is OFF: anyone who reaches the API can use it")
        collector.resume()
        yield
        await app.state.publisher.close()
        await app.state.events.close()
        await app.state.database.close()

    docs = settings.docs_on
    app = FastAPI(
        title="taskdock",
        version="0.1.0",
        summary="Durable background tasks behind an HTTP API.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.celery_app = celery_app
    app.state.database = Database(settings=settings)
    app.state.events = EventHub(settings=settings, run=app.state.database.autocommit)
    app.state.publisher = Publisher(celery_app, timeout=settings.publish_timeout)
    app.state.submitter = Submitter(
        settings=settings, database=app.state.database, publisher=app.state.publisher
    )
    app.state.rate_limiter = RateLimiter(settings)
    app.state.key_cache = KeyCache(seconds=settings.api_key_cache_seconds)
    app.state.state_registry = CollectorRegistry(auto_describe=False)
    app.state.state_registry.register(StateCollector(celery_app, settings=settings))
    app.state.state_registry.register(DeliveryCollector())
    metrics.PROCESSES.labels("api").set(1)
    install_error_handlers(app)
    # Outermost first. They run inside the request middleware (metrics, request id) and
    # outside its body limit, so even a 413 carries the request id and the CORS headers.
    guards: list[Guard] = []
    if settings.allowed_hosts != ["*"]:
        guards.append(partial(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts))
    if settings.cors_origins:
        guards.append(
            partial(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "PATCH", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"],
                expose_headers=["Location", "X-Request-ID", "Retry-After", "RateLimit-Remaining"],
            )
        )
    app.add_middleware(RequestMiddleware, max_bytes=settings.max_body_bytes, guards=guards)
    # Routes are matched in order: the API's first, since its polls and submits are most of
    # the traffic (probes and scrapes come every few seconds).
    include_api(app)
    app.include_router(health_router)
    app.include_router(metrics_router)
    # HTML pages with their own session and error pages, outside the /api JSON handling; built
    # on the first request for one (app/console/mount.py).
    mount_console(app)
    return app


app = create_app()
