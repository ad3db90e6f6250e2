"""When a schedule fires: its slots, and which of them to fire after a gap. Pure functions of
the schedule's timing and a clock, so the rules (DST, catch-up) are tested with a fixed one.

A cron slot is worked out in the schedule's own time zone by cronsim, then kept in UTC: at a
spring-forward gap a slot inside the missing hour fires once at the first minute after it, and
at a fall-back a wall-clock time that occurs twice fires once, at its first occurrence (a
pattern such as `*/30 * * * *` matches both hours and fires in each). Interval slots are
`anchor + k * interval_seconds`, in UTC, untouched by time zones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

# A cron schedule missed for longer than this many slots is skipped over without counting them
# one by one (a year of a once-a-minute cron is half a million).
MAX_COUNTED = 100_000


@dataclass(frozen=True)
class Timing:
    cron: str | None
    timezone: str
    interval_seconds: int | None
    anchor: datetime


@dataclass(frozen=True)
class Plan:
    fire: list[datetime]  # the slots to fire now, oldest first
    skipped: int  # due slots that will never fire (older than the window, or not the latest)
    next_fire_at: datetime  # the first slot not dealt with


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a 5-field cron expression, or None."""
    if len(expression.split()) != 5:
        return "a cron expression has 5 fields: minute hour day-of-month month day-of-week"
    try:
        CronSim(expression, datetime.now(UTC))
    except CronSimError as exc:
        return f"invalid cron expression: {exc}"
    return None


def zone_problem(name: str) -> str | None:
    """Why `name` is not an IANA time zone, or None."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {name!r}; use an IANA name such as Europe/Berlin"
    return None


def next_slot(timing: Timing, *, after: datetime) -> datetime:
    """The first slot strictly after `after`, in UTC."""
    if timing.interval_seconds is not None:
        step = timedelta(seconds=timing.interval_seconds)
        if after < timing.anchor:
            return timing.anchor
        return timing.anchor + ((after - timing.anchor) // step + 1) * step
    assert timing.cron is not None
    local = after.astimezone(ZoneInfo(timing.timezone))
    return next(CronSim(timing.cron, local)).astimezone(UTC)


def plan(
    timing: Timing, *, due: datetime, now: datetime, latest_only: bool, window: float, cap: int
) -> Plan:
    """What to do about the slots from `due` (the stored next slot) up to `now`.

    `latest_only`: fire the most recent of them and skip the rest. Otherwise fire each one no
    older than `window` seconds, at most `cap` now (the rest stay due), and skip older ones.
    """
    if due > now:
        return Plan(fire=[], skipped=0, next_fire_at=due)
    if latest_only:
        last, count = _last_at_or_before(timing, due, now)
        return Plan(fire=[last], skipped=count - 1, next_fire_at=next_slot(timing, after=now))
    slot, skipped = _first_at_or_after(timing, due, now - timedelta(seconds=window))
    fire: list[datetime] = []
    while slot <= now and len(fire) < cap:
        fire.append(slot)
        slot = next_slot(timing, after=slot)
    return Plan(fire=fire, skipped=skipped, next_fire_at=slot)


def _first_at_or_after(timing: Timing, slot: datetime, bound: datetime) -> tuple[datetime, int]:
    """The first slot at or after `bound`, from `slot` on, and how many came before it."""
    if slot >= bound:
        return slot, 0
    if timing.interval_seconds is not None:
        step = timedelta(seconds=timing.interval_seconds)
        count = -((slot - bound) // step)  # ceil((bound - slot) / step)
        return slot + count * step, count
    count = 0
    while slot < bound:
        if count >= MAX_COUNTED:
            return next_slot(timing, after=bound - timedelta(microseconds=1)), count
        slot = next_slot(timing, after=slot)
        count += 1
    return slot, count


def _last_at_or_before(timing: Timing, slot: datetime, bound: datetime) -> tuple[datetime, int]:
    """The last slot at or before `bound`, from `slot` (itself at or before it) on, and how
    many slots that makes in all."""
    if timing.interval_seconds is not None:
        step = timedelta(seconds=timing.interval_seconds)
        count = (bound - slot) // step
        return slot + count * step, count + 1
    count = 1
    while (following := next_slot(timing, after=slot)) <= bound:
        if count >= MAX_COUNTED:
            # Far behind: search back from just after `bound` (cron slots are a minute apart).
            start = (bound + timedelta(seconds=1)).astimezone(ZoneInfo(timing.timezone))
            latest = next(CronSim(timing.cron or "", start, True)).astimezone(UTC)
            return latest, count
        slot = following
        count += 1
    return slot, count
