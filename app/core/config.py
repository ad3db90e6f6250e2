"""One validated Settings object for every process role."""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import logging
import os
from collections.abc import Mapping
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from dotenv import dotenv_values
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
        # Each field's docstring is its description: the settings reference in docs/ is
        # generated from them (make docs-gen).
        use_attribute_docstrings=True,
    )

    environment: Environment = Environment.DEVELOPMENT
    """`development`, `test` or `production`; production refuses SQLite and the filesystem
    broker."""

    data_dir: Path = Path(".taskdock")
    """Embedded mode: the SQLite file and the filesystem broker's folders."""
    # URLs may carry a password: kept out of repr() and logs.
    database_url: str = Field(default="", repr=False)
    """E.g. `postgresql+psycopg://taskdock@db:5432/taskdock`; empty: SQLite in the data
    directory."""
    database_password: SecretStr | None = None
    """Inserted into the database URL when it has none."""
    database_pool_size: Annotated[int, Field(ge=1, le=200)] = 10
    """Database connections per process."""
    database_max_overflow: Annotated[int, Field(ge=0, le=200)] = 10
    """Extra connections under load. The API keeps its extra connections open once made (one
    closed at each return cost a new PostgreSQL backend every few requests) and queues requests
    past them on the event loop."""
    broker_url: str = Field(default="", repr=False)
    """`redis://redis:6379/0` or `amqp://taskdock@rabbitmq:5672//`; empty: the filesystem broker."""
    broker_password: SecretStr | None = None
    """Inserted into the broker URL when it has none."""

    api_host: str = "127.0.0.1"
    """The API's bind address (`0.0.0.0` in containers)."""
    api_port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """The API's port."""
    api_workers: Annotated[int, Field(ge=1, le=64)] = 1
    """uvicorn worker processes per API server."""
    api_graceful_timeout: Annotated[int, Field(ge=0, le=3600)] = 20
    """Seconds in-flight requests get after SIGTERM."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies whose `X-Forwarded-*` headers are trusted (comma-separated, or `*`)."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 1024 * 1024
    """Larger request bodies get 413 before they are read."""

    # With false the API never waits on the broker, and Celery's publish leaves its CPU
    # (bench/README.md).
    publish_on_submit: bool = True
    """Who tells the broker about a new task. `true`: the API, right after its commit (lowest
    latency; works with no dispatcher running). `false`: only the dispatcher, which PostgreSQL
    wakes at each commit (LISTEN/NOTIFY; SQLite: at its next scan)."""
    # The broker publish on the request path must never hang a request (celery/celery#4296).
    publish_timeout: Annotated[float, Field(gt=0, le=30)] = 1.0
    """Seconds a request may spend telling the broker."""
    health_timeout: Annotated[float, Field(gt=0, le=1)] = 0.8
    """Seconds per dependency check of `/health/ready`."""

    # Reliability core: leases, redelivery and the dispatcher's pace.
    task_lease_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    """A run's lease, in seconds: a vanished worker's task is handed out again after it."""
    task_max_deliveries: Annotated[int, Field(ge=1, le=100)] = 3
    """Hand-outs of one attempt before it is FAILED as poison."""
    task_default_time_limit: Annotated[float, Field(gt=0)] = 300.0
    """Seconds, for task types that declare no time limit of their own."""
    task_hard_limit_grace: Annotated[float, Field(ge=1, le=600)] = 10.0
    """Seconds from a task's soft time limit (raised in the task, recorded as its failure) to
    Celery's hard kill."""
    dispatcher_interval: Annotated[float, Field(gt=0, le=60)] = 0.5
    """Seconds between outbox scans (on PostgreSQL a commit also wakes the dispatcher at once)."""
    dispatcher_batch_size: Annotated[int, Field(ge=1, le=10000)] = 200
    """Tasks published per scan."""
    dispatch_grace_seconds: Annotated[float, Field(ge=0, le=60)] = 2.0
    """Seconds the dispatcher leaves fresh rows to the API's own publish."""
    republish_after_seconds: Annotated[float, Field(ge=10)] = 30.0
    """A waiting task whose message the broker no longer holds (a broker restarted empty) is
    published again once its last publication is this many seconds old; the dispatcher compares
    the broker's queues with the record every third of it, so a backlog is never sent twice."""
    reaper_interval: Annotated[float, Field(gt=0, le=300)] = 5.0
    """Seconds between lease sweeps."""

    # Retention: finished records are deleted by the dispatcher once this old (app.tasks.retention).
    retention_succeeded_seconds: Annotated[float, Field(ge=0)] = 7 * 24 * 3600.0
    """Seconds a SUCCEEDED task's record is kept after it finished (`0`: kept forever); a task
    type may set its own (`retention=` in its decorator)."""
    retention_failed_seconds: Annotated[float, Field(ge=0)] = 30 * 24 * 3600.0
    """Seconds a FAILED task's record is kept after it finished (`0`: kept forever)."""
    retention_cancelled_seconds: Annotated[float, Field(ge=0)] = 30 * 24 * 3600.0
    """Seconds a CANCELLED task's record is kept after it finished (`0`: kept forever)."""
    retention_interval: Annotated[float, Field(gt=0, le=86400)] = 60.0
    """Seconds between the dispatcher's purges of expired records (a purge that has more left
    goes on at the next tick)."""
    retention_batch_size: Annotated[int, Field(ge=1, le=10000)] = 1000
    """Records deleted per transaction by a purge: small batches keep each transaction short."""
    result_max_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = 1024 * 1024
    """The largest result a task may store, in bytes of its JSON; a larger one makes the run
    FAILED with `ResultTooLarge` (not retried: the same code returns the same result)."""
    list_max_bytes: Annotated[int, Field(ge=64 * 1024, le=1024 * 1024 * 1024)] = 4 * 1024 * 1024
    """Bytes of results one page of `GET /api/v1/tasks?include=result` may carry: the page ends
    early (with its cursor) once its results pass it; a page always has at least one task."""

    worker_concurrency: Annotated[int, Field(ge=1, le=256)] = 2
    """Pool processes per worker."""
    worker_heartbeat_file: Path = Path("/tmp/taskdock-worker.heartbeat")  # noqa: S108
    """Touched by the worker's consumer loop every 5 s; read by `taskdock worker-health`."""
    worker_heartbeat_max_age: Annotated[float, Field(gt=0)] = 30.0
    """Seconds; `taskdock worker-health` fails past this age."""
    dispatcher_heartbeat_file: Path = Path("/tmp/taskdock-dispatcher.heartbeat")  # noqa: S108
    """Touched by every healthy dispatcher tick; read by `taskdock dispatcher-health`."""
    dispatcher_heartbeat_max_age: Annotated[float, Field(gt=0)] = 30.0
    """Seconds; `taskdock dispatcher-health` fails past this age."""
    worker_events: bool = False
    """Celery's task events, for Flower and `celery events`: workers send them, and the API and
    the dispatcher send task-sent. Off: they cost the broker a message per step of every task."""

    task_modules: Annotated[list[str], NoDecode, Field(default_factory=list)]
    """Import paths of your own task modules, comma-separated; every process imports them."""
    extra_queues: Annotated[list[str], NoDecode, Field(default_factory=list)]
    """Queues a submission may name besides the task types' own, comma-separated (another
    queue is 422: no worker would consume it)."""

    metrics_dir: Path = Path("/tmp/taskdock-metrics")  # noqa: S108
    """prometheus-client's multiprocess files, one fresh directory per process group."""
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9808
    """Each worker serves its own `/metrics` on this port (`0`: off)."""
    worker_metrics_host: str = "127.0.0.1"
    """Where the worker's `/metrics` listens: loopback like the API, `0.0.0.0` in containers."""
    dispatcher_metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9809
    """The dispatcher serves its own `/metrics` on this port (`0`: off), on the worker's host
    (TASKDOCK_WORKER_METRICS_HOST): records deleted by the retention purge."""

    auth_enabled: bool = True
    """API keys on every `/api` route. Off only when asked (`taskdock dev` does), with a warning
    at start."""
    api_key_cache_seconds: Annotated[float, Field(ge=0, le=300)] = 5.0
    """How long each API process trusts a key it has checked; a revoked key is refused within
    this time (`0`: every request reads the key from the database)."""
    events_heartbeat_seconds: Annotated[float, Field(gt=0, le=300)] = 15.0
    """Seconds between heartbeat comments on an idle `/api/v1/events` stream, so proxies keep it
    open and clients notice a dead one."""
    events_poll_interval: Annotated[float, Field(ge=0.05, le=5)] = 0.25
    """SQLite: seconds between the API's looks for task changes while someone waits or streams
    (PostgreSQL is told at once by LISTEN/NOTIFY)."""
    events_idle_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    """PostgreSQL: an API process stops listening for task events when nobody has waited or
    streamed for this long. While any API process listens, every status change sends a
    notification, which costs PostgreSQL a lock at each commit (docs/events.md)."""
    bootstrap_api_key: SecretStr | None = None
    """Registered with the admin scope by `taskdock migrate`: a new deployment's first key."""

    console_secret: SecretStr | None = None
    """Signs the console's session cookies; unset: a random one per process, so sessions end on
    restart and differ between replicas (set it in production, the same on every replica)."""
    console_session_seconds: Annotated[float, Field(ge=60, le=30 * 24 * 3600)] = 8 * 3600.0
    """How long a console login lasts before the browser must log in again."""

    allowed_hosts: Annotated[list[str], NoDecode, Field(default_factory=lambda: ["*"])]
    """Host headers the API answers, comma-separated (`*`: any); another one gets 400."""
    cors_origins: Annotated[list[str], NoDecode, Field(default_factory=list)]
    """Browser origins allowed by CORS, comma-separated; empty: CORS off."""
    docs_enabled: bool | None = None
    """`/docs`, `/redoc` and `/openapi.json`; unset: on, except in production."""

    rate_limit_submit: str = "100/minute"
    """Submit, cancel and retry, per API key (per client IP when auth is off):
    `N/second|minute|hour|day`."""
    rate_limit_read: str = "1000/minute"
    """Reads and lists, per API key (per client IP when auth is off)."""
    rate_limit_auth_failures: str = "60/minute"
    """Requests with a missing or wrong API key, per client IP: guessing keys gets 429."""
    rate_limit_storage_url: str = Field(default="", repr=False)
    """Where every API process shares its counts, e.g. `redis://redis:6379/1`; empty: the Redis
    broker, else memory."""
    max_unfinished_tasks: Annotated[int, Field(ge=0)] = 1000
    """Unfinished tasks one API key may have at once; more get 429 (`0`: no quota)."""

    webhook_secret: SecretStr | None = None
    """The server secret each API key's webhook signing secret is derived from (HMAC-SHA256 of
    the key's id), so none is stored. Unset: a fixed development secret outside production, and
    in production submissions with a `notify_url` are refused. Changing it rotates every key's."""
    webhook_anonymous_secret: SecretStr | None = None
    """`whsec_…` signing the webhooks of anonymous submissions (auth off, `taskdock dev`); unset:
    derived from TASKDOCK_WEBHOOK_SECRET like a key's (`taskdock keys webhook-secret
    --anonymous` shows it)."""
    webhook_allowed_networks: Annotated[list[str], NoDecode, Field(default_factory=list)]
    """Networks (CIDRs, comma-separated) a `notify_url` may reach although they are not public:
    loopback, private, link-local and metadata addresses are refused unless listed here."""
    webhook_retry_window_seconds: Annotated[float, Field(ge=1, le=30 * 24 * 3600)] = 86400.0
    """How long a webhook is retried, with exponential backoff, before it is marked failed."""
    webhook_timeout_seconds: Annotated[float, Field(gt=0, le=30)] = 5.0
    """Seconds to connect, and again to read the answer, per webhook attempt."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The lowest level logged."""
    log_format: Literal["json", "console"] = "json"
    """`json`: one object per line on stdout; `console`: readable lines (`taskdock dev`)."""

    @field_validator("task_modules", "extra_queues", "allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"not a network: {network!r} (e.g. 10.0.0.0/8)") from None
        return value

    @field_validator("webhook_anonymous_secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value().removeprefix("whsec_")
            try:
                decoded = base64.b64decode(raw + "==", validate=False)
            except (ValueError, binascii.Error):
                decoded = b""
            if len(decoded) < 16:
                raise ValueError("not a webhook secret: give whsec_ and 16+ bytes in base64")
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
    def sqlite_path(self) -> Path:
        """The embedded database's file (when no TASKDOCK_DATABASE_URL names another)."""
        if self.database_url.startswith("sqlite"):
            return Path(make_url(self.database_url).database or "").resolve()
        return (self.data_dir / "taskdock.db").resolve()

    @property
    def redacted_database_url(self) -> str:
        """The database's URL as it may be shown: without its password."""
        return make_url(self.sqlalchemy_url).render_as_string(hide_password=True)

    @property
    def sqlalchemy_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{self.sqlite_path}"
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


# TASKDOCK_* variables read by the container entrypoint, compose files and clients, not here.
OTHER_VARIABLES = frozenset(
    {
        "SECRETS_DIR",
        "SECRETS_PATH",
        "MIGRATE_ON_START",
        "WAIT_TIMEOUT",
        "IMAGE",
        "HTTP_BIND",
        "HTTP_PORT",
        "CA_BUNDLE",
        # `taskdock tasks …` (app/remote.py): where the API is, and the key to use.
        "URL",
        "API_KEY",
    }
)


def unknown_variables(
    environ: Mapping[str, str | None], *, dotenv: Path | None = None
) -> list[str]:
    """A warning per TASKDOCK_* variable (environment or `.env`) that no setting reads.

    pydantic-settings ignores them, so a misspelt TASKDOCK_DATABSE_URL would silently leave
    the process on SQLite: each warning names the closest setting.
    """
    names = {name.upper() for name in Settings.model_fields} | OTHER_VARIABLES
    given = [key for key in environ if key.upper().startswith(ENV_PREFIX)]
    if dotenv is not None and dotenv.is_file():
        given += [key for key in dotenv_values(dotenv) if key.upper().startswith(ENV_PREFIX)]
    warnings = []
    for key in sorted(set(given)):
        name = key.upper().removeprefix(ENV_PREFIX)
        if name in names:
            continue
        close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
        hint = f"; did you mean {ENV_PREFIX}{close[0]}?" if close else ""
        warnings.append(f"unknown setting {key} is ignored{hint}")
    return warnings


def warn_unknown_variables() -> None:
    """Log `unknown_variables` of this process once its logging is configured."""
    logger = logging.getLogger("taskdock.config")
    for warning in unknown_variables(os.environ, dotenv=Path(".env")):
        logger.warning(warning)


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
