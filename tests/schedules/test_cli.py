"""`taskdock schedules`: operators list, create, pause, resume and delete any owner's schedules."""

from __future__ import annotations

from pathlib import Path

from tests.support.stack import base_env, taskdock


def said(*args: str, env: dict[str, str]) -> str:
    """A command's output to its reader, without the JSON log lines beside it."""
    result = taskdock(*args, env=env)
    assert result.returncode == 0, result.stderr
    return "".join(line for line in result.stdout.splitlines(True) if not line.startswith("{"))


def test_schedules_commands(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data")
    assert taskdock("migrate", env=env).returncode == 0
    created = taskdock(
        "schedules", "create", "--type", "process_data",
        "--payload", '{"user_id": 1, "data": "x"}',
        "--cron", "0 6 * * 1-5", "--timezone", "Europe/Paris",
        "--name", "weekday-report", "--owner", "key-1",
        env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "created schedule " in created.stdout
    listed = said("schedules", "list", env=env)
    assert "weekday-report  owner=key-1  process_data  cron '0 6 * * 1-5' Europe/Paris  active" in (
        listed
    )

    bad = taskdock(
        "schedules", "create", "--type", "process_data", "--payload", '{"user_id": 1}',
        "--cron", "0 6 * *", env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "cron: Value error, a cron expression has 5 fields" in bad.stderr
    invalid = taskdock(
        "schedules", "create", "--type", "process_data", "--payload", '{"user_id": 1}',
        "--interval", "60", env=env,
    )  # fmt: skip
    assert invalid.returncode == 2
    assert "body.payload.data: Field required" in invalid.stderr

    paused = taskdock("schedules", "pause", "weekday-report", env=env)
    assert paused.returncode == 0
    assert "  paused  " in said("schedules", "list", env=env)
    assert taskdock("schedules", "resume", "weekday-report", env=env).returncode == 0
    assert "  active  " in said("schedules", "list", env=env)
    assert taskdock("schedules", "delete", "weekday-report", env=env).returncode == 0
    assert said("schedules", "list", env=env) == ""
    gone = taskdock("schedules", "delete", "weekday-report", env=env)
    assert gone.returncode == 1
    assert "no schedule named 'weekday-report'" in gone.stderr
