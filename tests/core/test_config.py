"""Settings: environment, `.env`, secret files, and one readable line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.core.config import ConfigError, Environment, Settings, describe_validation_error
from tests.support.stack import base_env, taskdock


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for key in list(os.environ):
        if key.startswith("TASKDOCK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASKDOCK_SECRETS_DIR", str(tmp_path / "secrets"))
    return tmp_path


def test_defaults_are_the_embedded_mode(clean_env: Path) -> None:
    settings = Settings()

    assert settings.embedded
    assert settings.sqlalchemy_url.startswith("sqlite:///")
    assert settings.celery_broker_url == "filesystem://localhost/"
    assert settings.environment is Environment.DEVELOPMENT


def test_secret_files_fill_passwords_and_never_print(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = clean_env / "secrets"
    secrets.mkdir()
    (secrets / "taskdock_database_password").write_text("s3cr3t-db\n")
    (secrets / "taskdock_broker_password").write_text("s3cr3t-mq")
    monkeypatch.setenv("TASKDOCK_DATABASE_URL", "postgresql://taskdock@db:5432/taskdock")
    monkeypatch.setenv("TASKDOCK_BROKER_URL", "amqp://taskdock@mq:5672//")

    settings = Settings()

    assert settings.sqlalchemy_url == "postgresql+psycopg://taskdock:s3cr3t-db@db:5432/taskdock"
    assert settings.celery_broker_url == "amqp://taskdock:s3cr3t-mq@mq:5672//"
    assert settings.broker_name == "rabbitmq"
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings.model_dump())


def test_redis_password_without_user(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKDOCK_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("TASKDOCK_BROKER_PASSWORD", "pw")

    settings = Settings()

    assert settings.celery_broker_url == "redis://:pw@redis:6379/0"
    assert settings.broker_name == "redis"


def test_dotenv_file_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text("TASKDOCK_API_PORT=9123\nTASKDOCK_TASK_MODULES=a.b, c.d\n")

    settings = Settings()

    assert settings.api_port == 9123
    assert settings.task_modules == ["a.b", "c.d"]


def test_production_refuses_the_embedded_defaults(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKDOCK_ENVIRONMENT", "production")

    with pytest.raises(ValidationError) as caught:
        Settings()

    assert "TASKDOCK_DATABASE_URL must name PostgreSQL" in describe_validation_error(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TASKDOCK_API_PORT", "eighty"),
        ("TASKDOCK_DATABASE_URL", "mysql://x/y"),
        ("TASKDOCK_LOG_LEVEL", "LOUD"),
        ("TASKDOCK_HEALTH_TIMEOUT", "5"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    from app.core.config import get_settings

    monkeypatch.setenv(variable, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(caught.value)
    assert variable in message
    assert "\n" not in message


def test_process_stops_at_start_with_one_line(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data", TASKDOCK_API_PORT="eighty")

    result = taskdock("api", env=env)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("invalid configuration: TASKDOCK_API_PORT")
    assert "Traceback" not in result.stderr


def test_unimportable_task_module_is_one_line(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data", TASKDOCK_TASK_MODULES="no.such.module")

    result = taskdock("migrate", env=env)

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "invalid configuration: TASKDOCK_TASK_MODULES: cannot import 'no.such.module' "
        "(No module named 'no')"
    ]


def test_broker_password_is_quoted_into_the_url(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TASKDOCK_BROKER_URL", "amqp://taskdock@mq:5672//")
    monkeypatch.setenv("TASKDOCK_BROKER_PASSWORD", "p@ss/w:rd%")

    assert Settings().celery_broker_url == "amqp://taskdock:p%40ss%2Fw%3Ard%25@mq:5672//"


def test_unknown_variables_are_named_with_the_closest_setting(clean_env: Path) -> None:
    from app.core.config import unknown_variables

    (clean_env / ".env").write_text("TASKDOCK_LOG_LEVL=DEBUG\nTASKDOCK_API_PORT=9000\n")
    environ = {
        "TASKDOCK_DATABSE_URL": "postgresql://db/x",
        "TASKDOCK_API_HOST": "0.0.0.0",
        "TASKDOCK_MIGRATE_ON_START": "1",  # the container entrypoint's, not a setting
        "TASKDOCK_ZZZ": "1",
        "PATH": "/bin",
    }

    warnings = unknown_variables(environ, dotenv=clean_env / ".env")

    assert warnings == [
        "unknown setting TASKDOCK_DATABSE_URL is ignored; did you mean TASKDOCK_DATABASE_URL?",
        "unknown setting TASKDOCK_LOG_LEVL is ignored; did you mean TASKDOCK_LOG_LEVEL?",
        "unknown setting TASKDOCK_ZZZ is ignored",
    ]


def test_a_misspelt_variable_is_warned_by_the_process(tmp_path: Path) -> None:
    env = base_env(tmp_path / "data", TASKDOCK_DATABSE_URL="postgresql://db/x")
    assert taskdock("migrate", env=env).returncode == 0

    result = taskdock("status", env=env)

    assert result.returncode == 0, result.stderr
    assert "did you mean TASKDOCK_DATABASE_URL?" in result.stdout + result.stderr
