"""Where the versioned API is assembled: every route below needs an API key.

Health, metrics and the docs are mounted outside it in app/main.py, the only unauthenticated
routes. The console (app/console/) is mounted there too: its pages take the same keys through a
login and a session cookie instead of the Authorization header.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from app.auth.dependencies import Access
from app.core.errors import COMMON_RESPONSES
from app.schedules.router import router as schedules_router
from app.tasks.router import router as tasks_router
from app.webhooks.router import router as webhooks_router

# The tasks first: polls and submits are most of the traffic, and routes match in order.
ROUTERS: tuple[APIRouter, ...] = (tasks_router, webhooks_router, schedules_router)


def include_api(app: FastAPI) -> None:
    """Each domain's router straight into the app, not through a router of routers: FastAPI
    matches an included router's routes through one more level on every request (20 µs of a
    poll's CPU, measured 2026-12-04)."""
    for router in ROUTERS:
        app.include_router(router, responses=COMMON_RESPONSES)


def unguarded(routers: tuple[APIRouter, ...]) -> list[str]:
    """The routes of `routers` that take neither CanRead nor CanSubmit."""
    return [
        f"{sorted(getattr(route, 'methods', ()))} {getattr(route, 'path', route)}"
        for router in routers
        for route in router.routes
        if not isinstance(route, APIRoute)
        or not any(isinstance(sub.call, Access) for sub in route.dependant.dependencies)
    ]


# Each route takes its key check as its own one dependency (CanRead or CanSubmit), not from a
# router-wide one, which FastAPI would solve as one more node on every request. A route that
# forgets it is therefore never built.
if missing := unguarded(ROUTERS):
    raise RuntimeError(f"API routes without CanRead or CanSubmit: {', '.join(missing)}")
