"""Submit and poll efficiency, each against its baseline, measured side by side.

    python bench/bench_api.py [--rounds 5] [--seconds 10] [--connections 16]

1. Submit efficiency: sustained POST /api/v1/tasks (validation, durable insert, 202) under wrk
   ÷ raw Celery enqueue rate (`send_task`, no result backend) from one process, same Redis.
2. Poll efficiency: GET /api/v1/tasks/{id} ÷ a hello-world GET served with the same uvicorn
   settings (uvloop, httptools, one process).

Each round runs taskdock and its baseline back to back (A B A B ...); a round taken while CPU
steal was above 20% is repeated (twice at most). The figures of merit are ratios of medians.
Results: bench/results/<date>-api.json and a Markdown summary beside it. It starts its own
redis-server and PostgreSQL database and removes both at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
STEAL_LIMIT = 20.0
SUBMIT_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"type": "process_data", "payload": {"user_id": 7, "data": "benchmark"}}'
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_times() -> tuple[int, int]:
    """(total, steal) jiffies from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields), fields[7] if len(fields) > 7 else 0


def measure_steal(run: Callable[[], float]) -> tuple[float, float]:
    total0, steal0 = cpu_times()
    value = run()
    total1, steal1 = cpu_times()
    steal = 100.0 * (steal1 - steal0) / max(1, total1 - total0)
    return value, steal


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def process(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as handle:
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def scratch_database() -> Iterator[str]:
    name = f"taskdock_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wrk(url: str, *, seconds: int, connections: int, script: Path | None = None) -> float:
    """Requests per second; raises if more than 0.1% of answers were errors."""
    args = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    if errors > total / 1000:
        raise RuntimeError(f"{errors} of {total} answers were errors:\n{out}")
    return rate


def raw_enqueue_rate(broker: str, count: int) -> float:
    """Celery's own enqueue rate from one process: the baseline of submit efficiency."""
    code = f"""
import time
from celery import Celery
app = Celery("baseline", broker={broker!r})
app.conf.update(task_serializer="json", task_ignore_result=True)
with app.producer_or_acquire() as producer:
    app.send_task("baseline.noop", args=(0, 1), producer=producer, queue="baseline")
    started = time.perf_counter()
    for n in range({count}):
        app.send_task("baseline.noop", args=(n, 1), producer=producer, queue="baseline")
    print({count} / (time.perf_counter() - started))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return float(out.strip().splitlines()[-1])


def rounds(
    name: str, taskdock: Callable[[], float], baseline: Callable[[], float], count: int
) -> dict[str, object]:
    runs: list[dict[str, float]] = []
    for number in range(count):
        for attempt in range(3):
            a, steal_a = measure_steal(taskdock)
            b, steal_b = measure_steal(baseline)
            steal = max(steal_a, steal_b)
            if steal <= STEAL_LIMIT or attempt == 2:
                break
            print(f"  {name} round {number + 1}: steal {steal:.0f}%, repeating", flush=True)
        runs.append({"taskdock": a, "baseline": b, "steal_percent": round(steal, 1)})
        print(f"  {name} round {number + 1}/{count}: {a:,.0f} vs {b:,.0f} per s", flush=True)
    a_median = statistics.median(run["taskdock"] for run in runs)
    b_median = statistics.median(run["baseline"] for run in runs)
    return {
        "rounds": runs,
        "taskdock_median": round(a_median, 1),
        "baseline_median": round(b_median, 1),
        "ratio": round(a_median / b_median, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--enqueue-count", type=int, default=5000)
    options = parser.parse_args()
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        print("needs wrk and redis-server (Debian packages wrk, redis-server)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="taskdock-bench-"))
    redis_port, api_port, hello_port = free_port(), free_port(), free_port()
    broker = f"redis://127.0.0.1:{redis_port}/0"
    env = {key: value for key, value in os.environ.items() if not key.startswith("TASKDOCK_")}
    with scratch_database() as database_url:
        env.update(
            {
                "TASKDOCK_DATABASE_URL": database_url,
                "TASKDOCK_BROKER_URL": broker,
                "TASKDOCK_AUTH_ENABLED": "false",
                "TASKDOCK_RATE_LIMIT_SUBMIT": "100000000/minute",
                "TASKDOCK_RATE_LIMIT_READ": "100000000/minute",
                "TASKDOCK_MAX_UNFINISHED_TASKS": "0",
                "TASKDOCK_LOG_LEVEL": "WARNING",
                "TASKDOCK_METRICS_DIR": str(work / "metrics"),
                "TASKDOCK_DATA_DIR": str(work / "data"),
                "TASKDOCK_SECRETS_DIR": str(work / "no-secrets"),
            }
        )
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        redis_args = [
            "redis-server",
            "--port",
            str(redis_port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(work),
        ]
        api_args = [sys.executable, "-m", "app.cli", "api", "--port", str(api_port)]
        hello_args = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.hello_app:app",
            "--port",
            str(hello_port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        with (
            process(redis_args, env, work / "redis.log"),
            process(api_args, env, work / "api.log"),
            process(hello_args, env, work / "hello.log"),
        ):
            api = f"http://127.0.0.1:{api_port}"
            hello = f"http://127.0.0.1:{hello_port}"
            wait_http(f"{api}/health/live")
            wait_http(f"{hello}/hello")
            script = work / "submit.lua"
            script.write_text(SUBMIT_LUA)
            task = httpx.post(
                f"{api}/api/v1/tasks",
                json={"type": "process_data", "payload": {"user_id": 1, "data": "x"}},
            ).json()
            common = {"seconds": options.seconds, "connections": options.connections}
            print("submit efficiency", flush=True)
            submit = rounds(
                "submit",
                lambda: wrk(f"{api}/api/v1/tasks", script=script, **common),
                lambda: raw_enqueue_rate(broker, options.enqueue_count),
                options.rounds,
            )
            print("poll efficiency", flush=True)
            poll = rounds(
                "poll",
                lambda: wrk(f"{api}/api/v1/tasks/{task['id']}", **common),
                lambda: wrk(f"{hello}/hello", **common),
                options.rounds,
            )
    shutil.rmtree(work, ignore_errors=True)

    stamp = datetime.now(UTC)
    report = {
        "date": stamp.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": vars(options),
        "submit_efficiency": submit,
        "poll_efficiency": poll,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"{stamp:%Y-%m-%d}-api"
    base.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    base.with_suffix(".md").write_text(summary(report))
    print(summary(report))
    return 0


def summary(report: dict[str, object]) -> str:
    lines = [
        f"# API benchmark, {report['date']}",
        "",
        "| metric | taskdock (median/s) | baseline (median/s) | ratio | target |",
        "| --- | --- | --- | --- | --- |",
    ]
    targets = {"submit_efficiency": ">= 0.8", "poll_efficiency": ">= 0.5"}
    for key, target in targets.items():
        result = report[key]
        assert isinstance(result, dict)
        lines.append(
            f"| {key.replace('_', ' ')} | {result['taskdock_median']:,} | "
            f"{result['baseline_median']:,} | {result['ratio']} | {target} |"
        )
    lines += [
        "",
        "Baselines: raw Celery `send_task` from one process on the same Redis (submit);",
        "a hello-world GET on the same uvicorn settings (poll). Command: `make bench`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
