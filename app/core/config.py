"""One validated Settings object for every process role."""

from __future__ import annotations

import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url

ENV_PREFIX = "TASKDOCK_"
DEFAULT_SECRETS_DIR = "/run/secrets"


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    """Configuration read from TASKDOCK_* variables, `.env`, and secret files."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    environment: Environment = Environment.DEVELOPMENT

    # Embedded mode keeps the SQLite file and the filesystem broker's folders here.
    data_dir: Path = Path(".taskdock")
    # URLs may carry a password: kept out of repr() and logs.
    database_url: str = Field(default="", repr=False)
    database_password: SecretStr | None = None
    database_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    database_max_overflow: Annotated[int, Field(ge=0, le=200)] = 10
    broker_url: str = Field(default="", repr=False)
    broker_password: SecretStr | None = None

    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    api_workers: Annotated[int, Field(ge=1, le=64)] = 1
    api_graceful_timeout: Annotated[int, Field(ge=0, le=3600)] = 20
    forwarded_allow_ips: str = "127.0.0.1"
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024

    # Who tells the broker about a new task. True: the API, right after its commit (lowest
    # latency; works with no dispatcher running). False: only the dispatcher, which PostgreSQL
    # wakes at each commit (LISTEN/NOTIFY; SQLite polls every dispatcher_interval). The API
    # then never waits on the broker, and Celery's publish leaves its CPU (bench/README.md).
    publish_on_submit: bool = True
    # The broker publish on the request path must never hang a request (celery/celery#4296).
    publish_timeout: Annotated[float, Field(gt=0, le=30)] = 1.0
    health_timeout: Annotated[float, Field(gt=0, le=1)] = 0.8

    # Reliability core: leases, redelivery and the dispatcher's pace.
    task_lease_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    task_max_deliveries: Annotated[int, Field(ge=1, le=100)] = 3
    # For task types that declare no time limit of their own.
    task_default_time_limit: Annotated[float, Field(gt=0)] = 300.0
    # From the soft time limit (raised in the task, recorded as its failure) to the hard kill.
    task_hard_limit_grace: Annotated[float, Field(ge=1, le=600)] = 10.0
    dispatcher_interval: Annotated[float, Field(gt=0, le=60)] = 0.5
    dispatcher_batch_size: Annotated[int, Field(ge=1, le=10000)] = 200
    dispatch_grace_seconds: Annotated[float, Field(ge=0, le=60)] = 2.0
    republish_after_seconds: Annotated[float, Field(ge=10)] = 300.0
    reaper_interval: Annotated[float, Field(gt=0, le=300)] = 5.0

    worker_concurrency: Annotated[int, Field(ge=1, le=256)] = 2
    worker_heartbeat_file: Path = Path("/tmp/taskdock-worker.heartbeat")  # noqa: S108
    worker_heartbeat_max_age: Annotated[float, Field(gt=0)] = 30.0
    dispatcher_heartbeat_file: Path = Path("/tmp/taskdock-dispatcher.heartbeat")  # noqa: S108
    dispatcher_heartbeat_max_age: Annotated[float, Field(gt=0)] = 30.0

    # Users' own task modules, imported by every process (comma-separated in the environment).
    task_modules: Annotated[list[str], NoDecode, Field(default_factory=list)]
    # Queues a submission may name besides those of the registered task types.
    extra_queues: Annotated[list[str], NoDecode, Field(default_factory=list)]

    # prometheus-client's multiprocess files, one fresh directory per process group.
    metrics_dir: Path = Path("/tmp/taskdock-metrics")  # noqa: S108
    # Each worker serves its own /metrics here (0 turns it off).
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9808

    # API keys on every /api route. Off only when asked (`taskdock dev` does), with a warning.
    auth_enabled: bool = True
    # A key registered with the admin scope by `taskdock migrate` (a Docker or Kubernetes secret).
    bootstrap_api_key: SecretStr | None = None

    # Host headers the API answers (Starlette's TrustedHostMiddleware); "*" allows any.
    allowed_hosts: Annotated[list[str], NoDecode, Field(default_factory=lambda: ["*"])]
    # Browser origins allowed by CORS; empty turns CORS off.
    cors_origins: Annotated[list[str], NoDecode, Field(default_factory=list)]
    # /docs, /redoc and /openapi.json; unset means on, except in production.
    docs_enabled: bool | None = None

    # Per API key, or per client IP when auth is off; "N/second|minute|hour|day" (limits syntax).
    rate_limit_submit: str = "100/minute"
    rate_limit_read: str = "1000/minute"
    # Requests with a missing or wrong API key, per client IP: guessing keys gets 429.
    rate_limit_auth_failures: str = "60/minute"
    # Where counts are shared by every API process: default the Redis broker, else memory.
    rate_limit_storage_url: str = Field(default="", repr=False)
    # Unfinished tasks one API key may have at once (0: no quota).
    max_unfinished_tasks: Annotated[int, Field(ge=0)] = 1000

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @field_validator("task_modules", "extra_queues", "allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rate_limit_submit", "rate_limit_read", "rate_limit_auth_failures")
    @classmethod
    def _limit_syntax(cls, value: str) -> str:
        from limits import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError(f"not a rate limit: {value!r} (e.g. 100/minute)") from None
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _known_scheme(cls, value: str, info: object) -> str:
        if not value:
            return value
        scheme = value.split("://", 1)[0] if "://" in value else ""
        allowed = {
            "database_url": ("postgresql", "postgresql+psycopg", "sqlite"),
            "broker_url": ("redis", "rediss", "amqp", "amqps", "pyamqp", "filesystem"),
        }[getattr(info, "field_name", "")]
        if scheme not in allowed:
            raise ValueError(f"unsupported scheme {scheme!r}; use one of {', '.join(allowed)}")
        return value

    @model_validator(mode="after")
    def _production_needs_servers(self) -> Settings:
        if self.environment is Environment.PRODUCTION:
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("TASKDOCK_DATABASE_URL must name PostgreSQL in production")
            if not self.broker_url or self.broker_url.startswith("filesystem"):
                raise ValueError("TASKDOCK_BROKER_URL must name Redis or RabbitMQ in production")
        return self

    @property
    def docs_on(self) -> bool:
        if self.docs_enabled is not None:
            return self.docs_enabled
        return self.environment is not Environment.PRODUCTION

    @property
    def embedded(self) -> bool:
        return self.database_url == "" or self.database_url.startswith("sqlite")

    @property
    def sqlalchemy_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'taskdock.db').resolve()}"
        url = make_url(self.database_url)
        if url.drivername == "postgresql":
            url = url.set(drivername="postgresql+psycopg")
        if self.database_password is not None and not url.password:
            url = url.set(password=self.database_password.get_secret_value())
        return url.render_as_string(hide_password=False)

    @property
    def celery_broker_url(self) -> str:
        if not self.broker_url:
            return "filesystem://localhost/"
        if self.broker_password is None or "://" not in self.broker_url:
            return self.broker_url
        scheme, rest = self.broker_url.split("://", 1)
        # Quoted, so a password with @ / : % cannot break the URL.
        secret = quote(self.broker_password.get_secret_value(), safe="")
        if "@" in rest.split("/", 1)[0]:
            userinfo, host = rest.split("@", 1)
            if ":" in userinfo:
                return self.broker_url
            return f"{scheme}://{userinfo}:{secret}@{host}"
        return f"{scheme}://:{secret}@{rest}"

    @property
    def broker_name(self) -> str:
        """The key under which health reports the broker."""
        scheme = self.celery_broker_url.split("://", 1)[0]
        if scheme.startswith("redis"):
            return "redis"
        if scheme.startswith(("amqp", "pyamqp")):
            return "rabbitmq"
        return "broker"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Secret files (Docker secrets, mounted Kubernetes Secrets) are read only from a
        # directory that exists, so a laptop without /run/secrets sees no warning.
        secrets_dir = Path(os.environ.get(f"{ENV_PREFIX}SECRETS_DIR", DEFAULT_SECRETS_DIR))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if secrets_dir.is_dir():
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir))
        return tuple(sources)


class ConfigError(SystemExit):
    """A configuration problem, reported as one line naming the variable."""


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        name = ".".join(str(loc) for loc in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{ENV_PREFIX}{name.upper()}: {message}" if name else message)
    return "invalid configuration: " + "; ".join(parts)


@lru_cache
def get_settings() -> Settings:
    """The process's settings; an invalid value stops the process with one line."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
