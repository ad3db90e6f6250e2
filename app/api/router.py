"""Where the versioned API is assembled. Health, metrics and docs live outside it."""

from __future__ import annotations

from fastapi import APIRouter

from app.tasks.router import router as tasks_router

api_router = APIRouter()
api_router.include_router(tasks_router)
