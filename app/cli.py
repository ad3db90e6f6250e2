"""The `taskdock` command: every process role, and `dev` to run them all on one machine."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from app import remote
from app.core import collector
from app.core.config import ConfigError, get_settings

cli = typer.Typer(
    name="taskdock",
    help="Durable background tasks behind an HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
logger = logging.getLogger("taskdock.cli")

ExtraArgs = {"allow_extra_args": True, "ignore_unknown_options": True}
# The commands that turn the garbage collector back on themselves once built
# (app/core/collector.py); every other command does as it starts.
SERVERS = {"api", "worker", "dispatcher"}


@cli.callback()
def _start(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand not in SERVERS:
        collector.resume()


def _setup(role: str) -> None:
    from app.core.config import warn_unknown_variables
    from app.core.db import configure
    from app.core.logging import configure_logging
    from app.tasks.registry import load_task_modules

    settings = get_settings()
    configure_logging(level=settings.log_level, fmt=settings.log_format)
    warn_unknown_variables()
    configure(settings, role=role)
    load_task_modules(settings.task_modules)
    if role == "cli":
        _require_migrated()


def _require_migrated() -> None:
    """Commands that read the record need its tables: say so in one line, create nothing."""
    from app.core.db import get_engine
    from app.db import migrate as migrations

    settings = get_settings()
    where = settings.redacted_database_url
    if settings.embedded and not settings.sqlite_path.exists():
        raise ConfigError(
            f"no taskdock database at {settings.sqlite_path}: run `taskdock migrate` "
            "(or `taskdock dev`) first, or set TASKDOCK_DATA_DIR or TASKDOCK_DATABASE_URL"
        )
    current = migrations.current(get_engine())
    head = migrations.head()
    if current != head:
        raise ConfigError(
            f"the database at {where} is at revision {current or 'none'}, not {head}: "
            "run `taskdock migrate` first"
        )


@cli.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (TASKDOCK_API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (TASKDOCK_API_PORT).")] = None,
    workers: Annotated[int | None, typer.Option(help="Processes (TASKDOCK_API_WORKERS).")] = None,
) -> None:
    """Serve the HTTP API with uvicorn (uvloop + httptools)."""
    import uvicorn

    from app.core.multiproc import prepare_multiprocess_dir

    settings = get_settings()
    # Before anything imports prometheus_client; the server's workers inherit it.
    prepare_multiprocess_dir(settings.metrics_dir, "api")
    _setup("api")
    if (workers or settings.api_workers) > 1:
        # This process only supervises; the workers are new interpreters (app/core/collector.py).
        collector.resume()
    uvicorn.run(
        "app.main:app",
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers or settings.api_workers,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=settings.api_graceful_timeout,
        log_config=None,
        server_header=False,
    )


@cli.command(context_settings=ExtraArgs)
def worker(
    ctx: typer.Context,
    queues: Annotated[
        str | None, typer.Option("--queues", "-Q", help="Comma-separated; default: every queue.")
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Pool processes (TASKDOCK_WORKER_CONCURRENCY).")
    ] = None,
) -> None:
    """Run a Celery worker; arguments after the options are passed to Celery."""
    from celery.bin.celery import celery as celery_command

    settings = get_settings()
    argv = [
        "worker",
        f"--loglevel={settings.log_level}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        # Without -Q the worker consumes the queues app.worker declares once the task modules
        # are loaded: every registered one (choosing them here, before that, missed them).
        *([f"--queues={queues}"] if queues else []),
        *ctx.args,
    ]
    # `celery -A app.worker worker ...`, keeping its exit code: worker_main() drops it, and a
    # worker dead of an unrecoverable error would exit 0, which Restart=on-failure ignores.
    code = celery_command.main(
        args=["-A", "app.worker.celery:celery_app", *argv], standalone_mode=False
    )
    if code:
        raise typer.Exit(int(code))


@cli.command()
def dispatcher() -> None:
    """Publish the outbox, reap expired leases, and schedule delayed tasks."""
    from app.core.celery import create_celery_app
    from app.tasks.dispatcher import Dispatcher

    _setup("dispatcher")
    settings = get_settings()
    _serve_metrics(settings.worker_metrics_host, settings.dispatcher_metrics_port, "dispatcher")
    loop = Dispatcher(settings=settings, celery_app=create_celery_app(settings))

    def _stop(signum: int, _frame: object) -> None:
        logger.info("stopping", extra={"signal": signal.Signals(signum).name})
        loop.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    collector.resume()
    loop.run_forever(heartbeat_file=settings.dispatcher_heartbeat_file)


def _serve_metrics(host: str, port: int, role: str) -> None:
    """This process's `/metrics` on `port` (0: off); a port in use is a warning, not an exit."""
    if not port:
        return
    from prometheus_client import start_http_server

    from app.core.metrics import collecting_registry

    try:
        start_http_server(port, addr=host, registry=collecting_registry())
    except OSError as exc:
        logger.warning(f"{role} metrics not served", extra={"port": port, "reason": str(exc)})
        return
    logger.info(f"{role} metrics served", extra={"host": host, "port": port})


@cli.command()
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema (under a PostgreSQL advisory lock)."""
    from app.core.db import get_engine
    from app.db import migrate as migrations

    _setup("migrate")
    engine = get_engine()
    migrations.upgrade(engine, revision)
    typer.echo(f"database at revision {migrations.current(engine)}")
    bootstrap = get_settings().bootstrap_api_key
    if bootstrap is not None and revision == "head":
        from app.auth import service as keys_service
        from app.core.db import session_scope

        with session_scope() as session:
            key = keys_service.ensure(
                session=session,
                name="bootstrap",
                scopes=[keys_service.Scope.ADMIN],
                plain=bootstrap.get_secret_value(),
            )
            typer.echo(f"bootstrap API key registered ({key.prefix})")


@cli.command()
def wait(
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 60.0,
) -> None:
    """Wait until the database and the broker answer (for container entrypoints)."""
    from app.api.health import broker_check
    from app.core.celery import create_celery_app
    from app.core.db import get_engine, ping

    _setup("wait")
    settings = get_settings()
    celery_app = create_celery_app(settings)
    deadline = time.monotonic() + timeout
    pending = {"database": False, settings.broker_name: False}
    reasons: dict[str, str] = {}
    while True:
        if not pending["database"]:
            try:
                ping(get_engine())
                pending["database"] = True
            except Exception as exc:
                reasons["database"] = str(exc).splitlines()[0] if str(exc) else repr(exc)
        if not pending[settings.broker_name]:
            try:
                broker_check(celery_app, 2)()
                pending[settings.broker_name] = True
            except Exception as exc:
                reasons[settings.broker_name] = str(exc) or repr(exc)
        if all(pending.values()):
            typer.echo("database and broker are ready")
            return
        if time.monotonic() >= deadline:
            missing = [name for name, ok in pending.items() if not ok]
            detail = "; ".join(f"{name}: {reasons.get(name, 'no answer')}" for name in missing)
            typer.echo(f"gave up after {timeout:g}s waiting for {detail}", err=True)
            raise typer.Exit(1)
        time.sleep(1)


def _check_heartbeat(path: Path, max_age: float, what: str) -> None:
    from app.healthcheck import heartbeat_status

    healthy, message = heartbeat_status(path, max_age, what)
    typer.echo(message, err=not healthy)
    if not healthy:
        raise typer.Exit(1)


@cli.command("worker-health")
def worker_health() -> None:
    """Exit 0 if this machine's worker consumer loop beat recently (a container healthcheck)."""
    settings = get_settings()
    _check_heartbeat(settings.worker_heartbeat_file, settings.worker_heartbeat_max_age, "worker")


@cli.command("dispatcher-health")
def dispatcher_health() -> None:
    """Exit 0 if this machine's dispatcher loop ran recently."""
    settings = get_settings()
    _check_heartbeat(
        settings.dispatcher_heartbeat_file, settings.dispatcher_heartbeat_max_age, "dispatcher"
    )


@cli.command()
def status(
    workers: Annotated[
        bool, typer.Option(help="List each live worker: queues, concurrency, active tasks.")
    ] = False,
) -> None:
    """What is waiting where: tasks by status, the outbox, each queue and who consumes it."""
    from sqlalchemy import func, select

    from app.core.db import session_scope
    from app.db.base import utcnow
    from app.tasks.models import Task
    from app.tasks.registry import known_queues
    from app.tasks.states import WAITING, TaskStatus
    from app.workers import service as workers_service

    _setup("cli")
    settings = get_settings()
    now = utcnow()
    waiting = sorted(WAITING)
    max_age = settings.worker_heartbeat_max_age
    with session_scope() as session:
        counts = dict(
            session.execute(select(Task.status, func.count()).group_by(Task.status)).all()
        )
        outbox = session.scalar(
            select(func.count()).where(
                Task.status.in_(waiting), Task.published_at.is_(None), Task.run_after <= now
            )
        )
        scheduled = session.scalar(
            select(func.count()).where(Task.status.in_(waiting), Task.run_after > now)
        )
        expired = session.scalar(
            select(func.count()).where(
                Task.status == TaskStatus.RUNNING, Task.lease_expires_at < now
            )
        )
        oldest = session.scalar(select(func.min(Task.created_at)).where(Task.status.in_(waiting)))
        queues = workers_service.queue_report(
            session=session, known=known_queues(settings.extra_queues), max_age=max_age
        )
        live = workers_service.live_workers(session=session, max_age=max_age)
        active = workers_service.running_by_worker(session=session)
    typer.echo(
        "tasks by status: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none")
    )
    typer.echo(f"outbox (due, not yet published): {outbox}")
    typer.echo(f"scheduled for later (countdown, eta, retry backoff): {scheduled}")
    typer.echo(f"running with an expired lease (worker lost): {expired}")
    if oldest is not None:
        typer.echo(f"oldest waiting task: {_age(now - oldest)} old")
    typer.echo(f"queues (waiting and due; workers consuming, heartbeat within {max_age:g}s):")
    width = max(len(queue.name) for queue in queues)
    for queue in queues:
        line = f"  {queue.name:<{width}}  {queue.waiting} waiting"
        if queue.waiting:
            line += f", oldest {_age(timedelta(seconds=queue.oldest_seconds))}"
        line += f"; {queue.consumers} worker{'' if queue.consumers == 1 else 's'}"
        if queue.stranded:
            line += (
                f"  <- NO WORKER consumes this queue; its tasks wait until one does "
                f"(taskdock worker -Q {queue.name})"
            )
        typer.echo(line)
    typer.echo(f"workers alive: {len(live)}")
    if workers:
        for worker in live:
            typer.echo(
                f"  {worker.name}  queues={','.join(worker.queues)}  "
                f"concurrency={worker.concurrency}  active={active.get(worker.name, 0)}  "
                f"last heartbeat {_age(now - worker.heartbeat_at)} ago  "
                f"(pid {worker.pid}, up {_age(now - worker.started_at)})"
            )


@cli.command()
def purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count the expired records; delete nothing.")
    ] = False,
) -> None:
    """Delete every expired finished record now (the dispatcher does it on its own)."""
    from app.core.db import get_engine
    from app.tasks import retention

    _setup("cli")
    engine = get_engine()
    purged = retention.purge(
        engine=engine,
        settings=get_settings(),
        lock=engine.dialect.name == "postgresql",
        dry_run=dry_run,
    )
    verb = "would delete" if dry_run else "deleted"
    counts = ", ".join(f"{status.value}={count}" for status, count in purged.counts.items())
    typer.echo(f"{verb} {purged.total} expired task records: {counts}")


def _age(delta: timedelta) -> str:
    return str(timedelta(seconds=max(0, int(delta.total_seconds()))))


cli.add_typer(remote.tasks, name="tasks")

keys = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
cli.add_typer(keys, name="keys")


@keys.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: submit, read, admin.")
    ] = "submit,read",
) -> None:
    """Create a key and print it once (and its webhook secret); only its hash is stored."""
    from app.auth import service as keys_service
    from app.core.db import session_scope
    from app.webhooks import signing

    _setup("cli")
    try:
        chosen = [keys_service.Scope(s.strip()) for s in scopes.split(",") if s.strip()]
    except ValueError:
        typer.echo(f"unknown scope in {scopes!r}; use submit, read, admin", err=True)
        raise typer.Exit(2) from None
    if not chosen:
        typer.echo("give at least one scope", err=True)
        raise typer.Exit(2)
    with session_scope() as session:
        key, plain = keys_service.create(session=session, name=name, scopes=chosen)
        typer.echo(f"created key {key.id} ({key.prefix}) for {name!r} with {', '.join(key.scopes)}")
    settings = get_settings()
    if signing.enabled(settings):
        # Before the key, which stays the last line (scripts take it so).
        typer.echo("its webhook secret (`taskdock keys webhook-secret` shows it again):", err=True)
        typer.echo(signing.secret_for(owner=str(key.id), settings=settings))
    typer.echo("store it now; it is not shown again:", err=True)
    typer.echo(plain)


@keys.command("webhook-secret")
def keys_webhook_secret(
    key: Annotated[
        str | None, typer.Argument(help="The key's id or prefix; omit with --anonymous.")
    ] = None,
    anonymous: Annotated[
        bool, typer.Option(help="The secret of anonymous submissions (auth off).")
    ] = False,
) -> None:
    """Print the `whsec_…` secret that signs the webhooks of a key's tasks."""
    from app.auth import service as keys_service
    from app.core.db import session_scope
    from app.core.errors import AppError
    from app.webhooks import signing

    _setup("cli")
    settings = get_settings()
    try:
        if anonymous:
            typer.echo(signing.secret_for(owner="", settings=settings))
            return
        if key is None:
            typer.echo("give a key's id or prefix, or --anonymous", err=True)
            raise typer.Exit(2)
        with session_scope() as session:
            found = keys_service.find(session=session, key=key)
            typer.echo(signing.secret_for(owner=str(found.id), settings=settings))
    except AppError as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(1) from None


@keys.command("list")
def keys_list() -> None:
    """Every key: id, prefix, name, scopes, created, revoked."""
    from app.auth import service as keys_service
    from app.core.db import session_scope

    _setup("cli")
    with session_scope() as session:
        for key in keys_service.list_keys(session=session):
            revoked = key.revoked_at.isoformat() if key.revoked_at else "active"
            typer.echo(
                f"{key.id}  {key.prefix}  {key.name}  {','.join(key.scopes)}  "
                f"{key.created_at.isoformat()}  {revoked}"
            )


@keys.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix.")]) -> None:
    """Revoke a key; every API process refuses it within TASKDOCK_API_KEY_CACHE_SECONDS."""
    from app.auth import service as keys_service
    from app.core.db import session_scope
    from app.core.errors import AppError

    _setup("cli")
    try:
        with session_scope() as session:
            revoked = keys_service.revoke(session=session, key=key)
            typer.echo(f"revoked {revoked.id} ({revoked.prefix})")
            seconds = get_settings().api_key_cache_seconds
            if seconds:
                typer.echo(f"API processes refuse it within {seconds:g} s", err=True)
    except AppError as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(1) from None


schedules = typer.Typer(
    help="List, create, pause, resume and delete schedules (every owner's).", no_args_is_help=True
)
cli.add_typer(schedules, name="schedules")


@schedules.command("list")
def schedules_list() -> None:
    """Every schedule: id, name, owner, type, when, state, next slot, fired/skipped."""
    from app.core.db import session_scope
    from app.schedules import service as schedules_service

    _setup("cli")
    with session_scope() as session:
        for item in schedules_service.list_schedules(session=session, owner=None, limit=100_000):
            when = (
                f"cron {item.cron!r} {item.timezone}"
                if item.cron
                else f"every {item.interval_seconds}s"
            )
            state = "paused" if item.paused else "active"
            typer.echo(
                f"{item.id}  {item.name or '-'}  owner={item.owner or '-'}  {item.type}  {when}  "
                f"{state}  next={item.next_fire_at.isoformat()}  "
                f"fired={item.fired_count} skipped={item.skipped_count}"
            )


@schedules.command("create")
def schedules_create(
    type_: Annotated[str, typer.Option("--type", help="A registered task type.")],
    payload: Annotated[str, typer.Option(help="The task's input, as JSON.")] = "{}",
    cron: Annotated[str | None, typer.Option(help="5-field cron expression.")] = None,
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron.")] = "UTC",
    interval: Annotated[int | None, typer.Option(help="Fire every N seconds instead.")] = None,
    name: Annotated[str | None, typer.Option(help="Unique per owner.")] = None,
    owner: Annotated[str, typer.Option(help="The owning API key's id (empty: none).")] = "",
    queue: Annotated[str | None, typer.Option(help="Overrides the type's queue.")] = None,
    priority: Annotated[int, typer.Option(help="0-9, 9 runs first.")] = 0,
    overlap: Annotated[str, typer.Option(help="allow, or skip while one is unfinished.")] = "allow",
    catchup: Annotated[str, typer.Option(help="latest, or all within the window.")] = "latest",
    catchup_window: Annotated[int, typer.Option(help="Seconds, for --catchup all.")] = 3600,
    notify_url: Annotated[
        str | None, typer.Option(help="Where each fired task's final record is POSTed.")
    ] = None,
) -> None:
    """Create a schedule and print its id."""
    import asyncio
    import json

    from pydantic import ValidationError

    from app.core.db import session_scope
    from app.core.errors import AppError
    from app.schedules import service as schedules_service
    from app.schedules.schemas import ScheduleCreate
    from app.webhooks.service import check_notify_url

    _setup("cli")
    try:
        data = ScheduleCreate.model_validate(
            {
                "type": type_,
                "payload": json.loads(payload),
                "cron": cron,
                "timezone": timezone,
                "interval_seconds": interval,
                "name": name,
                "queue": queue,
                "priority": priority,
                "overlap": overlap,
                "catchup": catchup,
                "catchup_window_seconds": catchup_window,
                "notify_url": notify_url,
            }
        )
        if data.notify_url is not None:
            asyncio.run(check_notify_url(url=data.notify_url, settings=get_settings()))
        with session_scope() as session:
            created = schedules_service.create(
                session=session,
                data=data,
                owner=owner,
                extra_queues=get_settings().extra_queues,
            )
            typer.echo(
                f"created schedule {created.id}; next slot {created.next_fire_at.isoformat()}"
            )
    except json.JSONDecodeError as exc:
        typer.echo(f"--payload is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            typer.echo(f"{where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None
    except AppError as exc:
        details = exc.details.get("fields") or []
        typer.echo(exc.message, err=True)
        for error in details:
            typer.echo(
                f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']}", err=True
            )
        raise typer.Exit(2) from None


def _schedule_action(ref: str, action: str) -> None:
    from app.core.db import session_scope
    from app.core.errors import AppError
    from app.schedules import service as schedules_service

    _setup("cli")
    try:
        with session_scope() as session:
            found = schedules_service.find(session=session, ref=ref)
            if action == "delete":
                schedules_service.delete(session=session, schedule_id=found.id, owner=None)
                typer.echo(f"deleted schedule {found.id}")
                return
            change = schedules_service.pause if action == "pause" else schedules_service.resume
            changed = change(session=session, schedule_id=found.id, owner=None)
            state = "paused" if changed.paused else f"next slot {changed.next_fire_at.isoformat()}"
            typer.echo(f"{action}d schedule {changed.id}; {state}")
    except AppError as exc:
        typer.echo(exc.message, err=True)
        raise typer.Exit(1) from None


@schedules.command("pause")
def schedules_pause(ref: Annotated[str, typer.Argument(help="The schedule's id or name.")]) -> None:
    """Pause a schedule: no slot fires until it is resumed."""
    _schedule_action(ref, "pause")


@schedules.command("resume")
def schedules_resume(
    ref: Annotated[str, typer.Argument(help="The schedule's id or name.")],
) -> None:
    """Resume a schedule from its next slot after now (slots missed while paused are not owed)."""
    _schedule_action(ref, "resume")


@schedules.command("delete")
def schedules_delete(
    ref: Annotated[str, typer.Argument(help="The schedule's id or name.")],
) -> None:
    """Delete a schedule; the tasks it fired stay."""
    _schedule_action(ref, "delete")


@cli.command()
def dev(
    host: Annotated[
        str | None, typer.Option(help="API bind address (TASKDOCK_API_HOST, default 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="API port (TASKDOCK_API_PORT, default 8000).")
    ] = None,
) -> None:
    """Run everything on this machine: migrations, the API, a worker and the dispatcher."""
    os.environ.setdefault("TASKDOCK_LOG_FORMAT", "console")
    # A laptop service on loopback: no keys needed (the API warns about it at start).
    os.environ.setdefault("TASKDOCK_AUTH_ENABLED", "false")
    get_settings.cache_clear()
    settings = get_settings()
    data = settings.data_dir.resolve()
    ensure_writable_dir(data, "TASKDOCK_DATA_DIR")
    # Everything of this instance under its data directory, so two instances (two checkouts,
    # two data directories) never share a heartbeat, a metrics folder or a port; what the user
    # set explicitly wins.
    defaults = {
        "data_dir": str(data),
        "worker_heartbeat_file": str(data / "worker.heartbeat"),
        "dispatcher_heartbeat_file": str(data / "dispatcher.heartbeat"),
        "metrics_dir": str(data / "metrics"),
        "worker_metrics_port": str(_free_port(settings.worker_metrics_host)),
        "dispatcher_metrics_port": str(_free_port(settings.worker_metrics_host)),
    }
    for name, value in defaults.items():
        if name not in settings.model_fields_set:
            os.environ[f"TASKDOCK_{name.upper()}"] = value
    get_settings.cache_clear()
    settings = get_settings()
    host = host or settings.api_host
    port = port or settings.api_port
    migrate()
    metrics = (
        f"http://{settings.worker_metrics_host}:{settings.worker_metrics_port}/metrics"
        if settings.worker_metrics_port
        else "off"
    )
    typer.echo(
        f"taskdock dev: API on http://{host}:{port} (docs at /docs), worker metrics at {metrics}\n"
        f"  data in {data} (stop, then delete it to start afresh)\n"
        f"  CLI: {Path(sys.executable).parent / 'taskdock'} status; Ctrl-C stops everything"
    )
    base = [sys.executable, "-m", "app.cli"]
    children = {
        "api": subprocess.Popen([*base, "api", "--host", host, "--port", str(port)]),  # noqa: S603
        "worker": subprocess.Popen(  # noqa: S603
            [*base, "worker", "--without-mingle", "--without-gossip"]
        ),
        "dispatcher": subprocess.Popen([*base, "dispatcher"]),  # noqa: S603
    }
    code = _supervise(children, database=settings.sqlite_path)
    raise typer.Exit(code)


def ensure_writable_dir(path: Path, variable: str) -> None:
    """Create `path` and prove it writable, or stop with one line naming the setting."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"invalid configuration: {variable}: cannot write to {path} ({reason})"
        ) from None


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _supervise(children: dict[str, subprocess.Popen[bytes]], *, database: Path) -> int:
    """Wait until Ctrl-C, SIGTERM or a child's exit, then stop every child.

    Also says once if the database file is deleted (or replaced) under the running processes:
    they keep running, and readiness reports it, but the user at the terminal must know why.
    """
    stopping = False
    inode = _inode(database)
    told = False

    def _terminate(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _terminate)
    code = 0
    try:
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    typer.echo(f"{name} exited with {child.returncode}; stopping", err=True)
                    code = child.returncode or 1
                    stopping = True
            if not told and _inode(database) != inode:
                told = True
                typer.echo(
                    f"the database file {database} was deleted: /health/ready is false and new "
                    "tasks are refused until taskdock dev is restarted",
                    err=True,
                )
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return code


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except OSError:
        return None


def main() -> None:
    collector.pause()
    from sqlalchemy.exc import DBAPIError

    try:
        cli()
    except DBAPIError as exc:
        # No traceback for a database that is away or refuses: one line, as for settings.
        first = str(exc.orig or exc).strip().splitlines()[0]
        raise SystemExit(f"taskdock: database error: {first}") from None


if __name__ == "__main__":
    main()
