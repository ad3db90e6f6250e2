"""Where the versioned API is assembled: every route below needs an API key.

Health, metrics and the docs are mounted outside it in app/main.py, the only unauthenticated
routes. The console (app/console/) is mounted there too: its pages take the same keys through a
login and a session cookie instead of the Authorization header.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.auth.dependencies import get_principal
from app.core.errors import COMMON_RESPONSES
from app.schedules.router import router as schedules_router
from app.tasks.router import router as tasks_router
from app.webhooks.router import router as webhooks_router

api_router = APIRouter(dependencies=[Depends(get_principal)], responses=COMMON_RESPONSES)
api_router.include_router(tasks_router)
api_router.include_router(webhooks_router)
api_router.include_router(schedules_router)
