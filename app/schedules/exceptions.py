"""Errors of the schedules domain."""

from __future__ import annotations

from app.core.errors import Conflict, NotFound


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"
    message = "schedule not found"


class ScheduleNameTaken(Conflict):
    code = "schedule_name_taken"
    message = "this API key already has a schedule of that name"
