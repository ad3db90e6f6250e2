"""Slots and catch-up plans on a fixed clock: cron in a time zone across DST, intervals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from app.schedules.slots import Timing, cron_problem, next_slot, plan, zone_problem

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def cron(expression: str, zone: str) -> Timing:
    return Timing(cron=expression, timezone=zone, interval_seconds=None, anchor=ANCHOR)


def every(seconds: int) -> Timing:
    return Timing(cron=None, timezone="UTC", interval_seconds=seconds, anchor=ANCHOR)


def slots(timing: Timing, start: datetime, count: int) -> list[datetime]:
    found = []
    for _ in range(count):
        start = next_slot(timing, after=start)
        found.append(start)
    return found


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_a_daily_cron_keeps_its_wall_clock_time_across_spring_forward() -> None:
    # New York moves from UTC-5 to UTC-4 on 2026-03-08.
    found = slots(cron("0 9 * * *", "America/New_York"), utc(2026, 3, 6, 15), 3)
    assert found == [utc(2026, 3, 7, 14), utc(2026, 3, 8, 13), utc(2026, 3, 9, 13)]


def test_a_slot_in_the_missing_hour_fires_once_just_after_it() -> None:
    # Berlin skips 02:00-03:00 local on 2026-03-29 (01:00 UTC).
    found = slots(cron("30 2 * * *", "Europe/Berlin"), utc(2026, 3, 28, 12), 3)
    assert found == [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30), utc(2026, 3, 31, 0, 30)]


def test_a_repeated_wall_clock_time_fires_once_at_fall_back() -> None:
    # Berlin's 02:30 happens twice on 2026-10-25 (00:30 and 01:30 UTC): one slot, the first.
    found = slots(cron("30 2 * * *", "Europe/Berlin"), utc(2026, 10, 24, 12), 2)
    assert found == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_an_every_half_hour_cron_fires_in_both_repeated_hours() -> None:
    found = slots(cron("*/30 * * * *", "Europe/Berlin"), utc(2026, 10, 24, 23, 45), 6)
    assert found == [utc(2026, 10, 25, 0) + timedelta(minutes=30 * i) for i in range(6)]
    assert len(set(found)) == 6


def test_interval_slots_are_aligned_to_the_anchor() -> None:
    timing = every(7)
    assert next_slot(timing, after=ANCHOR) == ANCHOR + timedelta(seconds=7)
    assert next_slot(timing, after=ANCHOR + timedelta(seconds=7)) == ANCHOR + timedelta(seconds=14)
    assert next_slot(timing, after=ANCHOR + timedelta(seconds=20.5)) == ANCHOR + timedelta(
        seconds=21
    )
    assert next_slot(timing, after=ANCHOR - timedelta(days=1)) == ANCHOR


def test_catchup_latest_fires_only_the_most_recent_missed_slot() -> None:
    due = ANCHOR + timedelta(seconds=1)
    now = ANCHOR + timedelta(seconds=10.5)
    result = plan(every(1), due=due, now=now, latest_only=True, window=3600, cap=1000)
    assert result.fire == [ANCHOR + timedelta(seconds=10)]
    assert result.skipped == 9
    assert result.next_fire_at == ANCHOR + timedelta(seconds=11)


def test_catchup_all_fires_each_slot_within_the_window_once() -> None:
    due = ANCHOR + timedelta(seconds=1)
    now = ANCHOR + timedelta(seconds=10.5)
    result = plan(every(1), due=due, now=now, latest_only=False, window=4, cap=1000)
    assert result.fire == [ANCHOR + timedelta(seconds=s) for s in (7, 8, 9, 10)]
    assert result.skipped == 6
    assert result.next_fire_at == ANCHOR + timedelta(seconds=11)
    capped = plan(every(1), due=due, now=now, latest_only=False, window=60, cap=3)
    assert capped.fire == [ANCHOR + timedelta(seconds=s) for s in (1, 2, 3)]
    assert capped.next_fire_at == ANCHOR + timedelta(seconds=4)


def test_catchup_of_a_cron_across_a_dst_change() -> None:
    # Hourly in Berlin, dispatcher away for the fall-back night: 5 UTC hours, 5 slots.
    timing = cron("0 * * * *", "Europe/Berlin")
    result = plan(
        timing,
        due=utc(2026, 10, 24, 23),
        now=utc(2026, 10, 25, 3, 10),
        latest_only=False,
        window=24 * 3600,
        cap=1000,
    )
    assert result.fire == [utc(2026, 10, 24, 23) + timedelta(hours=i) for i in range(5)]
    assert result.skipped == 0
    latest = plan(
        timing,
        due=utc(2026, 10, 24, 23),
        now=utc(2026, 10, 25, 3, 10),
        latest_only=True,
        window=60,
        cap=1000,
    )
    assert latest.fire == [utc(2026, 10, 25, 3)]
    assert latest.skipped == 4


def test_nothing_is_due_before_the_next_slot() -> None:
    due = ANCHOR + timedelta(seconds=5)
    result = plan(
        every(5), due=due, now=ANCHOR + timedelta(seconds=4), latest_only=True, window=1, cap=1
    )
    assert result.fire == []
    assert result.next_fire_at == due


def test_bad_cron_and_zone_are_named() -> None:
    assert cron_problem("0 3 * * *") is None
    assert "5 fields" in (cron_problem("0 3 * *") or "")
    assert "5 fields" in (cron_problem("0 0 3 * * *") or "")
    assert cron_problem("61 * * * *") is not None
    assert zone_problem("Europe/Berlin") is None
    assert zone_problem("Mars/Olympus") is not None
    assert zone_problem("../etc/passwd") is not None
