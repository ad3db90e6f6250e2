"""Engines and sessions: one engine per process, labelled with the process role."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row, namedtuple_row
from sqlalchemy import Connection, Dialect, Engine, create_engine, event, make_url, text
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, MultipleResultsFound
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import sqltypes
from sqlalchemy.util import greenlet_spawn

from app.core import metrics
from app.core.config import Settings
from app.core.errors import ServiceUnavailable

_lock = threading.Lock()
_engine: Engine | None = None
_engine_pid: int | None = None
_sessions: sessionmaker[Session] | None = None
# What `configure` was given at this process's start: the engine is built from it.
_settings: Settings | None = None
_role = "api"
READ_ONLY = "taskdock_read_only"
# A request must not wait long behind a lock (a migration, a stuck transaction): it answers 503.
_API_LIMITS = {"options": "-c lock_timeout=2000 -c statement_timeout=10000"}
# The worker's and the dispatcher's writes (claim, lease, outbox marks) do not wait for their
# WAL flush. A database crash can forget the last fraction of a second of them, and each such
# loss costs nothing lasting (app.tasks.lifecycle: a forgotten claim is put back by the run's
# next write). A run's outcome is the exception: its statement asks for the flush itself, since
# the message is acknowledged right after it. The API's INSERT keeps synchronous commit: a 202
# promises a durable record. docs/reliability.md has the whole trade-off.
_BACKGROUND_COMMITS = {"options": "-c synchronous_commit=off"}
_ROLE_OPTIONS = {
    "api": _API_LIMITS,
    "worker": _BACKGROUND_COMMITS,
    "dispatcher": _BACKGROUND_COMMITS,
}


class DatabaseFileGone(ServiceUnavailable):
    code = "database_file_gone"

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}: restart taskdock to use a new one")


class EncodedJSON(str):
    """A value's JSON made already by `json_dumps` (a run's result, measured against its size
    limit before the write): written as it is, not encoded a second time."""

    __slots__ = ()


def json_dumps(value: Any) -> str:
    """JSON columns as JSON is defined: NaN and Infinity are refused (ValueError) when written,
    on every database alike, instead of stored where no JSON reader can take them back.

    ASCII only (non-ASCII as escapes), so the text's length is its size in bytes."""
    if isinstance(value, EncodedJSON):
        return value
    return json.dumps(value, allow_nan=False)


def configure(settings: Settings, *, role: str) -> None:
    """Called once at each process's start (app.main, app.worker.celery, app.cli): the
    settings this process's engine is built from, and its role (api, worker, dispatcher, cli),
    which names it in the database's connection list.

    Services never read settings for themselves: the process's entry point reads them once and
    hands them over, here and to the objects it builds. An engine built from other settings
    (a test's earlier configuration) is forgotten.
    """
    global _settings, _role
    if settings is not _settings:
        reset_engine()
    _settings, _role = settings, role


def _configured() -> Settings:
    if _settings is None:
        raise RuntimeError("no settings: call app.core.db.configure() at the process's start")
    return _settings


def build_engine(settings: Settings, *, role: str) -> Engine:
    engine = _create(settings, role=role)
    _instrument(engine)
    return engine


def _create(settings: Settings, *, role: str) -> Engine:
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            pool_pre_ping=False,
            json_serializer=json_dumps,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "connect", _remember_file(engine.url.database or ""))
        event.listen(engine, "begin", _sqlite_begin_immediate)
        return engine
    engine = create_engine(url, **_postgres_options(settings, role=role))
    _ping_after_idle(engine)
    return engine


def build_async_engine(settings: Settings, *, role: str) -> AsyncEngine:
    """PostgreSQL through psycopg's asyncio side, for the API's request path.

    The same driver, pool settings, timeouts and instrumentation as the synchronous engine;
    its round trips wait on the event loop instead of in a thread. Under load, threads that
    each took the GIL back after every round trip cost the API more CPU than its queries.
    """
    if settings.embedded:
        raise ValueError("the asyncio engine is for PostgreSQL; SQLite work runs in threads")
    # The overflow kept open: an overflow connection is closed when it comes back to a full
    # pool, so 16 concurrent polls on a pool of 10 (+10) opened a PostgreSQL backend every seven
    # requests, and connecting cost more than the queries. Here every connection the API opens,
    # up to pool size + overflow as before, stays pooled; past that a request waits on the event
    # loop for one (at most pool_timeout, then 503).
    options = {
        **_postgres_options(settings, role=role),
        "pool_size": settings.database_pool_size + settings.database_max_overflow,
        "max_overflow": 0,
    }
    engine = create_async_engine(settings.sqlalchemy_url, **options)
    _ping_after_idle(engine.sync_engine)
    _instrument(engine.sync_engine)
    return engine


class Statements:
    """The API's hottest statements, sent by psycopg itself: no SQLAlchemy execution on the way.

    A poll's SELECT, a group commit's INSERT and the quota's count are written with SQLAlchemy
    Core and compiled once here to SQL. Each run checks a connection out of the asyncio
    engine's pool (its pings after idle, its reconnection at once after a database restart, its
    pool metrics) and sends the prepared statement on the psycopg connection underneath,
    reading dict rows (`_driver`). Per statement that cost 0.3-0.4 ms of CPU on this machine
    kind against 0.5-0.7 ms through the engine's execution and result machinery (measured
    2026-12-02), and 70 µs less since the checkout skips the engine's Connection (2026-12-04).
    psycopg_pool's own pool measured 0.18 ms, but it backs off from a database that was away
    and answered 503 for seconds after it came back.

    Rows come back with aware UTC datetimes and decoded JSON, as the ORM gives them.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._pool = engine.sync_engine.pool
        self.compiled = CompiledStatements(psycopg_dialect.dialect())  # type: ignore[no-untyped-call]

    async def fetch_one(self, statement: Any, parameters: dict[str, Any]) -> dict[str, Any] | None:
        compiled = self.compiled.get(statement)
        values = compiled.parameters(parameters)
        async with self._driver() as driver:
            started = time.perf_counter()
            async with driver.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(compiled.sql, values, prepare=True)
                row: dict[str, Any] | None = await cursor.fetchone()
            self._observe(compiled, started)
        if row is not None:
            for key, value in row.items():
                if isinstance(value, datetime) and value.tzinfo is not None:
                    row[key] = value.astimezone(UTC)
        return row

    async def execute_many(self, statement: Any, rows: list[dict[str, Any]]) -> None:
        """Many parameter sets in one transaction: pipelined, one commit (one WAL flush)."""
        compiled = self.compiled.get(statement, tuple(rows[0]))
        values = [compiled.parameters(row) for row in rows]
        async with self._driver() as driver:
            started = time.perf_counter()
            async with driver.transaction(), driver.cursor() as cursor:
                await cursor.executemany(compiled.sql, values)
            self._observe(compiled, started)

    @contextlib.asynccontextmanager
    async def _driver(self) -> AsyncIterator[Any]:
        """The psycopg connection of a connection checked out of the engine's pool, in
        autocommit while the statement runs; discarded from the pool if it broke.

        Straight from the pool, not through `engine.connect()`: the engine's Connection (its
        events, its isolation level set and reset through the dialect) cost 120 µs of CPU a
        statement against 55 µs for the pool's checkout and psycopg's own autocommit switch
        (measured 2026-12-04), and a poll makes one statement. The pool still pings after idle,
        counts its connections for the metrics, and resets what comes back.
        """
        fairy = await greenlet_spawn(self._pool.connect)
        driver: psycopg.AsyncConnection[Any] = fairy.driver_connection  # type: ignore[assignment]
        try:
            await driver.set_autocommit(True)
            yield driver
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            await greenlet_spawn(fairy.invalidate, exc)
            raise
        finally:
            if fairy.is_valid:
                try:
                    # Back as the pool's sessions expect it. Cancelled mid-statement, the
                    # connection is still busy and refuses: then it is not reused.
                    await driver.set_autocommit(False)
                except psycopg.Error as exc:
                    await greenlet_spawn(fairy.invalidate, exc)
            await greenlet_spawn(fairy.close)

    def _observe(self, compiled: CompiledStatement, started: float) -> None:
        metrics.DB_QUERY_SECONDS.labels(compiled.kind).observe(time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class CompiledStatement:
    """A Core statement as psycopg's SQL, and what each run sends besides the caller's values.

    The caller's parameters are the statement's required bind parameters (`bindparam("name")`
    with no value: lifecycle's `b_…`, the quota's `owner`, an INSERT's columns); every other
    value is the statement's own (its literals), sent with each run.
    """

    sql: str
    kind: str  # the label of its duration metric: select, insert, update, with...
    own: dict[str, Any]
    json: frozenset[str]  # the caller's parameters that go to JSON columns

    def parameters(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The values to send, JSON ones encoded as the engine encodes JSON columns
        (`json_dumps`, the engines' json_serializer) and sent to the SQL's ::JSON cast, so a
        value JSON cannot hold (NaN, bytes) raises ValueError or TypeError here, before any
        round trip."""
        values = {**self.own, **given}
        for name in self.json.intersection(given):
            if values[name] is not None:
                values[name] = json_dumps(values[name])
        return values


class CompiledStatements:
    """Statements built once (module constants), each compiled for `dialect` the first time it
    is run, then found by id(): compiling costs more than a run. For an INSERT of many rows,
    `keys` are its columns."""

    LIMIT = 100  # only statements built once belong here

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._cache: dict[tuple[int, tuple[str, ...]], tuple[Any, CompiledStatement]] = {}

    def get(self, statement: Any, keys: tuple[str, ...] = ()) -> CompiledStatement:
        cached = self._cache.get((id(statement), keys))
        if cached is not None and cached[0] is statement:
            return cached[1]
        compiled = _compile(statement, self.dialect, keys)
        if len(self._cache) >= self.LIMIT:
            self._cache.clear()
        self._cache[(id(statement), keys)] = (statement, compiled)
        return compiled


def _compile(statement: Any, dialect: Dialect, keys: tuple[str, ...]) -> CompiledStatement:
    compiled = statement.compile(dialect=dialect, column_keys=list(keys) or None)
    sql = str(compiled)
    if "POSTCOMPILE" in sql:
        # An IN list is expanded per execution by SQLAlchemy; write it as equalities.
        raise ValueError(f"a statement compiled once cannot run an IN list: {sql}")
    own: dict[str, Any] = {}
    json_names: set[str] = set()
    for bind, name in compiled.bind_names.items():
        if not bind.required:
            own[name] = bind.effective_value
        elif isinstance(bind.type, sqltypes.JSON):
            json_names.add(name)
    return CompiledStatement(sql=sql, kind=statement_kind(sql), own=own, json=frozenset(json_names))


def _postgres_options(settings: Settings, *, role: str) -> dict[str, Any]:
    return {
        "json_serializer": json_dumps,
        "pool_size": settings.database_pool_size,
        "max_overflow": settings.database_max_overflow,
        # Pinged only after a pause: see _ping_after_idle.
        "pool_pre_ping": False,
        # Waiting long for a pooled connection would break the API's 2-second promise.
        "pool_timeout": 2,
        "connect_args": _connect_args(role),
    }


def _connect_args(role: str) -> dict[str, Any]:
    return {
        "application_name": f"taskdock-{role}",
        # A dead database must surface quickly: health and submit promise seconds, not minutes.
        "connect_timeout": 2,
        "tcp_user_timeout": 1500,
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 2,
        "keepalives_count": 2,
        **_ROLE_OPTIONS.get(role, {}),
    }


def listen_connection(settings: Settings, *, role: str) -> tuple[str, dict[str, Any]]:
    """The libpq URL and options of a process's own LISTEN connection, outside any pool,
    named `taskdock-<role>` in the database's connection list as the pools' are."""
    url = make_url(settings.sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False), _connect_args(role)


# A connection back in the pool for less than this is not pinged before its next use. A ping is
# a round trip, and pinging on every checkout cost a fifth of a worker's time per task. A busy
# connection broken by a database restart fails on its next statement instead; SQLAlchemy then
# replaces every pooled connection, so each process sees one failure (the API answers 503, the
# worker hands the message back).
PING_AFTER_IDLE_SECONDS = 1.0


def _ping_after_idle(engine: Engine) -> None:
    @event.listens_for(engine.pool, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out another (SQLAlchemy's
            # documented pessimistic disconnect handling).
            raise DisconnectionError() from exc


def _instrument(engine: Engine) -> None:
    """Statement durations and pool usage, from SQLAlchemy's events."""
    size = engine.pool.size() if hasattr(engine.pool, "size") else 0
    metrics.DB_POOL_SIZE.inc(size)

    @event.listens_for(engine, "before_cursor_execute")
    def _before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info.setdefault("query_started", []).append(time.perf_counter())

    @event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = conn.info["query_started"].pop()
        metrics.DB_QUERY_SECONDS.labels(statement_kind(statement)).observe(
            time.perf_counter() - started
        )

    @event.listens_for(engine, "handle_error")
    def _error(context: Any) -> None:
        if context.connection is not None:
            stack = context.connection.info.get("query_started")
            if stack:
                stack.pop()

    @event.listens_for(engine.pool, "checkout")
    def _checkout(*_: Any) -> None:
        metrics.DB_POOL_IN_USE.inc()

    @event.listens_for(engine.pool, "checkin")
    def _checkin(*_: Any) -> None:
        metrics.DB_POOL_IN_USE.dec()


_KINDS = {"select", "insert", "update", "delete", "begin", "commit", "rollback", "with", "pragma"}


def statement_kind(sql: str) -> str:
    """The label of a statement's duration metric: its first word, or "other"."""
    words = sql.split(None, 1)
    kind = words[0].lower() if words else "other"
    return kind if kind in _KINDS else "other"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; several processes share the file.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


# The inode of each SQLite file when this process first opened it. A file deleted (or deleted
# and made again) under running processes leaves them writing to a file nobody will open again:
# every task they accept would be lost at the next start.
_sqlite_files: dict[str, int] = {}


def _remember_file(path: str) -> Any:
    def on_connect(_dbapi_connection: Any, _record: Any) -> None:
        with contextlib.suppress(OSError):
            _sqlite_files.setdefault(path, os.stat(path).st_ino)

    return on_connect


def sqlite_file_problem(path: str) -> str | None:
    """Why the SQLite file this process writes is no longer the one at `path`, if it is not.

    Only a file this process has opened can have gone: one not made yet is made at connect.
    """
    known = _sqlite_files.get(path)
    if known is None:
        return None
    try:
        inode = os.stat(path).st_ino
    except FileNotFoundError:
        return f"the database file {path} was deleted"
    if known != inode:
        return f"the database file {path} was replaced"
    return None


def _sqlite_begin_immediate(connection: Any) -> None:
    # Take the write lock at BEGIN so two processes never deadlock upgrading read locks;
    # read-only work (the health check) asks for a plain BEGIN and never waits for writers.
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine() -> Engine:
    """The process's engine; a forked child (Celery prefork) gets its own pool."""
    global _engine, _engine_pid
    pid = os.getpid()
    if _engine is not None and _engine_pid == pid:
        return _engine
    with _lock:
        if _engine is None or _engine_pid != pid:
            if _engine is not None:
                # Inherited from the parent: drop its sockets without closing them under it.
                _engine.dispose(close=False)
            _engine = build_engine(_configured(), role=_role)
            _engine_pid = pid
        return _engine


def reset_engine() -> None:
    """Forget the engine and the settings it was built from (tests, `configure`)."""
    global _engine, _engine_pid, _settings
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _engine_pid = None
        _settings = None
        _sqlite_files.clear()


def session_factory() -> sessionmaker[Session]:
    """The process's session factory, made once per engine.

    A new sessionmaker is a new Session subclass, and SQLAlchemy sets up its event dispatch
    for each one: made per request, that was a measurable share of the API's CPU.
    """
    global _sessions
    engine = get_engine()
    factory = _sessions
    if factory is None or factory.kw.get("bind") is not engine:
        factory = _sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    return factory


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commit on success, roll back on any error."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@contextmanager
def statement_scope() -> Iterator[Connection | DirectConnection]:
    """A connection for work that is one statement: each commits on its own.

    The worker's writes (claim, lease renewal, outcome) are single conditional UPDATEs, built
    once. On PostgreSQL they run on the process's `DirectConnection`: one round trip each in
    autocommit, and no SQLAlchemy execution machinery, which cost a worker more CPU than the
    statements. SQLite keeps its BEGIN IMMEDIATE transaction on the engine.
    """
    engine = get_engine()
    if engine.dialect.name == "postgresql":
        yield direct_connection(engine)
    else:
        with engine.begin() as connection:
            yield connection


class DirectResult:
    """What the worker's statements read of a result: the rows and how many were changed."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def one_or_none(self) -> Any:
        if len(self.rows) > 1:
            raise MultipleResultsFound("more than one row")
        return self.rows[0] if self.rows else None


class DirectConnection:
    """A worker process's own psycopg connection, for statements built once
    (app.tasks.lifecycle): each is compiled once (`CompiledStatements`), sent prepared, in
    autocommit.

    It speaks as SQLAlchemy does where callers listen: a psycopg error is raised as
    SQLAlchemy's (OperationalError for a database that is away, DataError for a value it
    refuses), and JSON parameters are encoded before the round trip, so a value JSON cannot
    hold raises ValueError or TypeError without touching the database. Shared by the run and
    its lease renewal thread: psycopg serialises their statements.
    """

    def __init__(self, engine: Engine, *, role: str) -> None:
        self.dialect = engine.dialect
        url = engine.url.set(drivername="postgresql")
        self._conninfo = url.render_as_string(hide_password=False)
        self._args = _connect_args(role)
        self._args["options"] = f"{self._args.get('options', '')} -c timezone=UTC".strip()
        self._connection: Any = None
        self._idle_since = 0.0
        self.compiled = CompiledStatements(self.dialect)
        self._lock = threading.Lock()

    def execute(self, statement: Any, parameters: dict[str, Any]) -> DirectResult:
        compiled = self.compiled.get(statement)
        values = compiled.parameters(parameters)
        started = time.perf_counter()
        try:
            with self._lock:
                cursor = self._connect().execute(compiled.sql, values, prepare=True)
                rows = cursor.fetchall() if cursor.description else []
                result = DirectResult(rows, cursor.rowcount)
                self._idle_since = time.monotonic()
        except psycopg.Error as exc:
            if self._connection is not None and self._connection.closed:
                self._connection = None
            raise DBAPIError.instance(compiled.sql, values, exc, psycopg.Error) from exc
        metrics.DB_QUERY_SECONDS.labels(compiled.kind).observe(time.perf_counter() - started)
        return result

    def _connect(self) -> Any:
        connection = self._connection
        if (
            connection is not None
            and time.monotonic() - self._idle_since >= PING_AFTER_IDLE_SECONDS
        ):
            # As the engine's pool does (_ping_after_idle): after a pause, make sure the
            # database is still the one we knew, so a restart costs a reconnect, not an error.
            try:
                connection.execute("SELECT 1")
            except psycopg.Error:
                connection.close()
                connection = None
        if connection is None or connection.closed:
            connection = psycopg.connect(
                self._conninfo, autocommit=True, row_factory=namedtuple_row, **self._args
            )
            self._connection = connection
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


_direct: DirectConnection | None = None
_direct_key: tuple[int, int] | None = None


def direct_connection(engine: Engine) -> DirectConnection:
    """This process's DirectConnection to `engine`'s database; a forked child gets its own."""
    global _direct, _direct_key
    key = (os.getpid(), id(engine))
    if _direct is None or _direct_key != key:
        with _lock:
            if _direct is None or _direct_key != key:
                if _direct is not None and _direct_key is not None and _direct_key[0] == key[0]:
                    _direct.close()  # the engine was replaced in this process
                _direct, _direct_key = DirectConnection(engine, role=_role), key
    return _direct


def ping(engine: Engine) -> None:
    """One round trip; on SQLite, first that the file is still the one the processes use."""
    if engine.dialect.name == "sqlite":
        problem = sqlite_file_problem(engine.url.database or "")
        if problem is not None:
            raise DatabaseFileGone(problem)
    with engine.connect().execution_options(**{READ_ONLY: True}) as connection:
        connection.execute(text("SELECT 1"))
