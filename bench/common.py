"""What every benchmark shares: processes, services, CPU and memory accounting, rounds, reports.

Nothing here imports from tests/: the benchmarks keep their own helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
RABBIT_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")
STEAL_LIMIT = 20.0
STEAL_ATTEMPTS = 3
BENCH_APP_NAME = "taskdock-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

console = Console()


# --- progress -------------------------------------------------------------------------------


class Ui:
    """One rich progress display for the whole run; log lines print above the bars."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )

    def log(self, message: str) -> None:
        self.progress.console.print(message, highlight=False)

    def task(self, description: str, total: int) -> TaskID:
        return self.progress.add_task(description, total=total)

    def advance(self, task: TaskID, steps: int = 1) -> None:
        self.progress.advance(task, steps)


ui = Ui()


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], *, timeout: float, what: str, every: float = 0.05) -> float:
    """Seconds until `check()` held; raises after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")


def http_status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


@dataclass
class Proc:
    """A process this benchmark started, in its own session so its pool children go with it."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    started_at: float = 0.0
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.log.open("ab") as handle:
            self.started_at = time.monotonic()
            self.popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tree(self) -> list[int]:
        """This process and all its descendants (a worker's pool children)."""
        return [self.pid, *descendants(self.pid)] if self.alive() else []

    def check(self) -> bool:
        """True while it runs; raises with the end of its log once it has exited."""
        if not self.alive():
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{self.name} exited:\n{tail}")
        return True

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL to its process group; only what we started."""
        if self.popen is None:
            return
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    parents = parent_map()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process, from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; PSS splits shared pages among their sharers."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


class CpuMeter:
    """CPU seconds used by groups of processes between start() and stop().

    Samples every `interval`, so processes that exit in between (pool children, database
    backends of closed connections) still count up to their last sample.
    """

    def __init__(self, groups: dict[str, Callable[[], Iterable[int]]], interval: float = 0.5):
        self.groups = groups
        self.interval = interval
        self.first: dict[str, dict[int, float]] = {name: {} for name in groups}
        self.last: dict[str, dict[int, float]] = {name: {} for name in groups}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False

    def _sample(self) -> None:
        for name, pids in self.groups.items():
            for pid in pids():
                value = cpu_seconds(pid)
                if value is None:
                    continue
                # A process first seen after the start was born during the measurement.
                self.first[name].setdefault(pid, value if not self._started else 0.0)
                self.last[name][pid] = value

    def start(self) -> CpuMeter:
        self._sample()
        self._started = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return {
            name: round(
                sum(self.last[name][pid] - self.first[name][pid] for pid in self.last[name]), 3
            )
            for name in self.groups
        }


# --- CPU steal and rounds -------------------------------------------------------------------


def cpu_times() -> tuple[int, int]:
    """(total, steal) jiffies from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0


@contextmanager
def steal_meter() -> Iterator[list[float]]:
    """Yields a list that holds the steal percentage of the block once it ends."""
    out: list[float] = []
    total0, steal0 = cpu_times()
    yield out
    total1, steal1 = cpu_times()
    out.append(100.0 * (steal1 - steal0) / max(1, total1 - total0))


Sample = dict[str, Any]


def rounds(
    name: str,
    taskdock: Callable[[], Sample],
    baseline: Callable[[], Sample],
    count: int,
    *,
    keys: tuple[str, ...] = ("value",),
    unit: str = "/s",
    peers: dict[str, Callable[[], Sample]] | None = None,
) -> dict[str, Any]:
    """A B A B ...: `count` pairs; a pair taken while steal was above the limit is repeated.

    Each side returns a dict of numbers; the medians of `keys` and their ratios are the result.
    `peers` are more baselines, each taken after the baseline in every round (A B C D A B C D
    ...); their medians and taskdock's ratio to each are under "peers".
    """
    peers = peers or {}
    task = ui.task(name, count)
    runs: list[dict[str, Any]] = []
    for number in range(count):
        for attempt in range(STEAL_ATTEMPTS):
            a, steal_a = _with_steal(taskdock)
            b, steal_b = _with_steal(baseline)
            others = {peer: _with_steal(measure) for peer, measure in peers.items()}
            steal = max(steal_a, steal_b, *(value for _, value in others.values()))
            if steal <= STEAL_LIMIT or attempt == STEAL_ATTEMPTS - 1:
                break
            ui.log(f"  {name} round {number + 1}: steal {steal:.0f}%, repeating")
        run: dict[str, Any] = {
            "taskdock": a,
            "baseline": b,
            "steal_percent": round(steal, 1),
            "repeats": attempt,
        }
        if peers:
            run["peers"] = {peer: sample for peer, (sample, _) in others.items()}
        runs.append(run)
        shown = ", ".join(f"{key} {a[key]:,.4g} vs {b[key]:,.4g}{unit}" for key in keys)
        for peer, (sample, _) in others.items():
            shown += f"; {peer} " + ", ".join(f"{sample[key]:,.4g}{unit}" for key in keys)
        ui.log(f"  {name} {number + 1}/{count}: {shown} (steal {steal:.1f}%)")
        ui.advance(task)
    result: dict[str, Any] = {"rounds": runs}
    for key in keys:
        a_median = statistics.median(float(run["taskdock"][key]) for run in runs)
        b_median = statistics.median(float(run["baseline"][key]) for run in runs)
        suffix = "" if key == "value" else f"_{key}"
        result[f"taskdock_median{suffix}"] = round(a_median, 4)
        result[f"baseline_median{suffix}"] = round(b_median, 4)
        result[f"ratio{suffix}"] = round(a_median / b_median, 4) if b_median else None
        for peer in peers:
            p_median = statistics.median(float(run["peers"][peer][key]) for run in runs)
            found = result.setdefault("peers", {}).setdefault(peer, {})
            found[f"median{suffix}"] = round(p_median, 4)
            found[f"ratio{suffix}"] = round(a_median / p_median, 4) if p_median else None
    return result


def _with_steal(measure: Callable[[], Sample]) -> tuple[Sample, float]:
    """One side's sample, and the CPU steal percentage while it was taken."""
    with steal_meter() as steal:
        sample = measure()
    return sample, steal[0]


# The benchmark's API key: made anew each run (its subprocesses inherit it), registered in its
# scratch database only.
API_KEY = os.environ.setdefault("BENCH_API_KEY", f"bench-{secrets.token_urlsafe(24)}")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


# --- wrk ------------------------------------------------------------------------------------

WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


@dataclass
class WrkResult:
    rate: float
    requests: int
    errors: int
    latency_ms: dict[str, float] = field(default_factory=dict)


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    script: Path | None = None,
    max_errors: float = 1e-3,
) -> WrkResult:
    """Requests per second and latency percentiles; raises if too many answers were errors."""
    threads = min(2, connections)
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency"]
    # Every request carries the API key, the baselines' too: the same bytes on the wire.
    args += ["-H", f"Authorization: Bearer {API_KEY}"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rate_match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total_match = re.search(r"(\d+) requests in", out)
    if rate_match is None or total_match is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    total = int(total_match.group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(value) for value in socket_errors.groups()) if socket_errors else 0
    if errors > max(1, total * max_errors):
        raise RuntimeError(f"{errors} of {total} answers were errors:\n{out}")
    latency = {
        f"p{percent}": round(float(value) * WRK_UNITS[unit], 3)
        for percent, value, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
    }
    return WrkResult(
        rate=float(rate_match.group(1)), requests=total, errors=errors, latency_ms=latency
    )


def submit_script(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
    )
    return path


# --- services -------------------------------------------------------------------------------


@contextmanager
def redis_server(work: Path) -> Iterator[tuple[str, Proc]]:
    """A private redis-server on a free port: ours to flush, never the machine's."""
    port = free_port()
    args = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(work),
    ]
    proc = Proc("redis", args, dict(os.environ), work / "redis.log").start()
    try:
        url = f"redis://127.0.0.1:{port}"
        wait_for(lambda: _redis_ping(port), timeout=20, what="redis-server")
        yield url, proc
    finally:
        proc.stop()


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def scratch_database() -> Iterator[tuple[str, str]]:
    """(url, name) of a fresh PostgreSQL database, dropped at the end."""
    name = f"taskdock_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def rabbit_vhost() -> Iterator[str]:
    """A broker URL on a vhost of our own on the machine's RabbitMQ, deleted at the end."""
    vhost = f"taskdock-bench-{uuid.uuid4().hex[:8]}"
    user = make_url(RABBIT_URL.replace("amqp://", "postgresql://", 1)).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
        yield f"{RABBIT_URL}/{vhost}"
    finally:
        rabbitmqctl("delete_vhost", vhost)


def rabbit_available() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


# What every benchmarked taskdock gets: limits too high to refuse anything, no unfinished-task
# quota, quiet logs, and the benchmark's task types.
UNLIMITED = {
    "TASKDOCK_RATE_LIMIT_SUBMIT": "100000000/minute",
    "TASKDOCK_RATE_LIMIT_READ": "100000000/minute",
    "TASKDOCK_MAX_UNFINISHED_TASKS": "0",
    "TASKDOCK_LOG_LEVEL": "WARNING",
    "TASKDOCK_TASK_MODULES": "bench.tasks",
}


def unconfigured_env() -> dict[str, str]:
    """This shell's environment with no taskdock, benchmark or metrics setting of its own, and
    the checkout on the path (bench.tasks)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TASKDOCK_", "BENCH_")) and key != "PROMETHEUS_MULTIPROC_DIR"
    }
    env["PYTHONPATH"] = str(ROOT)
    return env


@dataclass
class Bench:
    """One module's private world: a redis-server, a migrated scratch database, a work dir."""

    work: Path
    redis_url: str
    redis_proc: Proc
    database_url: str
    database_name: str
    engine: Engine
    procs: list[Proc] = field(default_factory=list)

    def env(self, broker_url: str | None = None, **extra: str) -> dict[str, str]:
        """taskdock's environment as deployed (API keys on, rate limits counted) but with
        limits too high to refuse anything, no quota (no worker drains the submit rounds),
        quiet logs."""
        env = unconfigured_env()
        env.update(UNLIMITED)
        env.update(
            {
                "TASKDOCK_DATABASE_URL": self.database_url,
                "TASKDOCK_BROKER_URL": broker_url or f"{self.redis_url}/0",
                "TASKDOCK_AUTH_ENABLED": "true",
                # Registered (admin) by `taskdock migrate`; every request sends it (AUTH).
                "TASKDOCK_BOOTSTRAP_API_KEY": API_KEY,
                "TASKDOCK_METRICS_DIR": str(self.work / "metrics"),
                "TASKDOCK_DATA_DIR": str(self.work / "data"),
                "TASKDOCK_SECRETS_DIR": str(self.work / "no-secrets"),
                "TASKDOCK_WORKER_METRICS_PORT": "0",
                "TASKDOCK_DISPATCHER_HEARTBEAT_FILE": str(self.work / "dispatcher.heartbeat"),
                # Where bench tasks record what they measured (not the broker's database).
                "BENCH_REDIS_URL": f"{self.redis_url}/1",
            }
        )
        env.update(extra)
        return env

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(name, args, env, self.work / f"{name}.log").start()
        self.procs.append(proc)
        return proc

    def api(
        self, env: dict[str, str], name: str = "api", *, command: str = "api", timeout: float = 60
    ) -> tuple[Proc, str]:
        """`taskdock api` (or `command`, which takes --port too: `dev`), once it is ready."""
        port = free_port()
        args = [sys.executable, "-m", "app.cli", command, "--port", str(port)]
        proc = self.spawn(name, args, env)
        base = f"http://127.0.0.1:{port}"
        wait_for(
            lambda: proc.check() and http_status(f"{base}/health/ready") == 200,
            timeout=timeout,
            what=f"{name} to be ready",
        )
        return proc, base

    def worker(self, env: dict[str, str], concurrency: int, name: str = "worker") -> Proc:
        heartbeat = self.work / f"{name}.heartbeat"
        heartbeat.unlink(missing_ok=True)
        env = {**env, "TASKDOCK_WORKER_HEARTBEAT_FILE": str(heartbeat)}
        args = [sys.executable, "-m", "app.cli", "worker", *worker_flags(concurrency, name)]
        proc = self.spawn(name, args, env)
        wait_for(
            lambda: proc.check() and heartbeat.exists(),
            timeout=60,
            what=f"{name} to consume",
        )
        return proc

    def dispatcher(self, env: dict[str, str]) -> Proc:
        return self.spawn("dispatcher", [sys.executable, "-m", "app.cli", "dispatcher"], env)

    def raw_worker(
        self,
        broker_url: str,
        concurrency: int,
        name: str = "raw",
        *,
        module: str = "bench.raw_celery",
        **extra: str,
    ) -> Proc:
        """The baseline's plain Celery worker, with the same flags as taskdock's.

        `name` is its hostname and queue (bench.raw_celery.queue); `extra` is more of its
        environment (BENCH_RESULT_BACKEND for a peer); `module` another plain Celery app
        (bench.e2e_floor).
        """
        ready = self.work / f"{name}-worker.ready"
        ready.unlink(missing_ok=True)
        env = self.env(
            broker_url,
            BENCH_BROKER_URL=broker_url,
            BENCH_READY_FILE=str(ready),
            BENCH_LOG_LEVEL="WARNING",
            BENCH_RAW_NAME=name,
            **extra,
        )
        args = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            module,
            "worker",
            "--loglevel=WARNING",
            *worker_flags(concurrency, name),
        ]
        proc = self.spawn(f"{name}-worker", args, env)
        wait_for(lambda: proc.check() and ready.exists(), timeout=60, what=f"the {name} worker")
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def backend_pids(self, database: str | None = None) -> list[int]:
        """PostgreSQL backends serving the scratch database (or `database`), except the
        benchmark's own."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = :name"
                    " AND application_name <> :me"
                ),
                {"name": database or self.database_name, "me": BENCH_APP_NAME},
            )
            return [int(row[0]) for row in rows]

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).scalar()

    def row(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as connection:
            return connection.execute(text(sql), params).one()


def worker_flags(concurrency: int, name: str) -> list[str]:
    """The flags both workers get: prefork, the same concurrency, no mingle or gossip."""
    return [
        "--pool=prefork",
        f"--concurrency={concurrency}",
        f"--hostname={name}@bench",
        "--without-mingle",
        "--without-gossip",
    ]


@contextmanager
def bench_world(name: str) -> Iterator[Bench]:
    """A redis-server and a migrated scratch database for one benchmark module."""
    work = Path(tempfile.mkdtemp(prefix=f"taskdock-bench-{name}-"))
    try:
        with redis_server(work) as (redis_url, redis_proc), scratch_database() as (url, db_name):
            engine = create_engine(
                url, connect_args={"application_name": BENCH_APP_NAME}, pool_size=2
            )
            bench = Bench(work, redis_url, redis_proc, url, db_name, engine)
            try:
                migrate = subprocess.run(
                    [sys.executable, "-m", "app.cli", "migrate"],
                    env=bench.env(),
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if migrate.returncode != 0:
                    raise RuntimeError(f"taskdock migrate failed:\n{migrate.stderr[-3000:]}")
                yield bench
            finally:
                bench.stop_all()
                engine.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


# --- machine info and reports ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("celery", "kombu", "fastapi", "uvicorn", "sqlalchemy", "psycopg", "redis"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    tools = {}
    for tool, args in (("redis-server", ["--version"]), ("pgbench", ["--version"])):
        if shutil.which(tool):
            tools[tool] = subprocess.run(
                [tool, *args], capture_output=True, text=True, check=False
            ).stdout.strip()
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "tools": tools,
        "git_commit": commit,
        "app_modified_since_commit": bool(dirty),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


def now_stamp() -> datetime:
    return datetime.now(UTC)


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


@dataclass
class Options:
    """Every knob of a run; `quick()` gives the few-minutes variant."""

    rounds: int = 5
    seconds: float = 10.0
    connections: int = 16
    enqueue_count: int = 5000
    sweep_connections: tuple[int, ...] = (1, 4, 16, 64)
    sweep_seconds: float = 5.0
    concurrency: int = 2
    drain_count: int = 3000
    latency_seconds: float = 10.0
    max_lag: float = 5.0
    footprint_tasks: int = 100_000
    footprint_max_seconds: float = 300.0
    startup_repeats: int = 3
    dev_tasks: int = 2000
    rabbitmq: bool = True
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Options:
        return cls(
            rounds=2,
            seconds=3.0,
            enqueue_count=2000,
            sweep_seconds=2.0,
            drain_count=1000,
            latency_seconds=3.0,
            max_lag=3.0,
            footprint_tasks=1500,
            footprint_max_seconds=30.0,
            startup_repeats=1,
            dev_tasks=500,
            quick=True,
        )
