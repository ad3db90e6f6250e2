"""Metrics 1 and 4, and throughput versus concurrency for submit and poll.

1. Submit efficiency: sustained POST /api/v1/tasks (validation, durable insert, 202, publish)
   under wrk ÷ raw Celery `send_task` rate from one process on the same Redis.
1c. Submit's floor (bench/submit_floor_app.py), in the same rounds: a bare FastAPI POST with
   group commit and one Redis pipeline per batch, no auth, limits, middleware or metrics.
1b. The same with TASKDOCK_PUBLISH_ON_SUBMIT=false: the API only records, and a dispatcher
   (running beside it, on the same cores) publishes each task, woken by the commit.
4. Poll efficiency: GET /api/v1/tasks/{id} ÷ a hello-world GET served with the same uvicorn
   settings (bench/hello_app.py: uvloop, httptools, one process).
Sweep: wrk at each of Options.sweep_connections for submit, poll and the hello baseline.
No worker runs here: submitted tasks stay QUEUED (published), as in the first results.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    AUTH,
    ROOT,
    Bench,
    Options,
    Proc,
    bench_world,
    free_port,
    http_status,
    rounds,
    submit_script,
    ui,
    wait_for,
    wrk,
)

SUBMIT_BODY = {"type": "process_data", "payload": {"user_id": 7, "data": "benchmark"}}


def estimate(options: Options) -> float:
    enqueue = options.enqueue_count / 1500
    pairs = options.rounds * (2 * (options.seconds + enqueue) + 3 * options.seconds + 5)
    sweep = 3 * len(options.sweep_connections) * (options.sweep_seconds + 0.5)
    return 15 + pairs + sweep


def raw_enqueue_rate(broker: str, count: int) -> dict[str, float]:
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
    return {"value": float(out.strip().splitlines()[-1])}


def _wrk_sample(url: str, options: Options, **kwargs: Any) -> dict[str, Any]:
    result = wrk(url, seconds=options.seconds, connections=options.connections, **kwargs)
    return {"value": result.rate, "latency_ms": result.latency_ms}


def _outbox_sample(bench: Bench, url: str, options: Options, script: Path) -> dict[str, Any]:
    """A submit round while the dispatcher publishes; how much it left unpublished at the end."""
    sample = _wrk_sample(url, options, script=script)
    sample["unpublished_at_end"] = bench.scalar(OUTBOX)
    wait_for(lambda: bench.scalar(OUTBOX) == 0, timeout=120, what="the outbox to drain")
    return sample


OUTBOX = "SELECT count(*) FROM task WHERE published_at IS NULL AND status = 'QUEUED'"


def sweep(bench: Bench, api: str, hello: str, task_id: str, options: Options) -> dict[str, Any]:
    script = submit_script(bench.work / "submit.lua", SUBMIT_BODY)
    targets = {
        "submit": (f"{api}/api/v1/tasks", script),
        "poll": (f"{api}/api/v1/tasks/{task_id}", None),
        "hello": (f"{hello}/hello", None),
    }
    progress = ui.task("concurrency sweep", len(targets) * len(options.sweep_connections))
    out: dict[str, Any] = {name: [] for name in targets}
    for connections in options.sweep_connections:
        for name, (url, lua) in targets.items():
            result = wrk(url, seconds=options.sweep_seconds, connections=connections, script=lua)
            out[name].append(
                {"connections": connections, "rate": result.rate, "latency_ms": result.latency_ms}
            )
            ui.log(
                f"  sweep {name} c={connections}: {result.rate:,.0f}/s, "
                f"p50 {result.latency_ms.get('p50', 0):.1f} ms, "
                f"p99 {result.latency_ms.get('p99', 0):.1f} ms"
            )
            ui.advance(progress)
    return out


def serve(bench: Bench, env: dict[str, str], *, name: str, app: str) -> tuple[Proc, str]:
    """A bare ASGI app (a baseline or a prototype), served with the API's uvicorn settings."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    return bench.spawn(name, args, env), f"http://127.0.0.1:{port}"


def poll_floor_server(bench: Bench, env: dict[str, str], task_id: str) -> tuple[Proc, str]:
    """Poll's minimal prototype (bench/poll_floor_app.py), and its URL of task `task_id`."""
    proc, base = serve(bench, env, name="poll-floor", app="bench.poll_floor_app:app")
    url = f"{base}/tasks/{task_id}"
    wait_for(lambda: http_status(url) == 200, timeout=30, what="poll floor app")
    return proc, url


def submit_floor_server(bench: Bench, env: dict[str, str]) -> tuple[Proc, str]:
    """Submit's minimal prototype (bench/submit_floor_app.py), and its submit URL."""
    proc, base = serve(bench, env, name="submit-floor", app="bench.submit_floor_app:app")
    wait_for(
        lambda: http_status(f"{base}/openapi.json") == 200,
        timeout=30,
        what="submit floor app",
    )
    return proc, f"{base}/tasks"


def hello_server(bench: Bench, env: dict[str, str], name: str = "hello") -> tuple[Proc, str]:
    """The hello-world app (poll's baseline)."""
    proc, base = serve(bench, env, name=name, app="bench.hello_app:app")
    wait_for(lambda: http_status(f"{base}/hello") == 200, timeout=30, what="hello app")
    return proc, base


def run(options: Options) -> dict[str, Any]:
    with bench_world("api") as bench:
        env = bench.env()
        broker = env["TASKDOCK_BROKER_URL"]
        _, api = bench.api(env)
        _, hello = hello_server(bench, env)
        script = submit_script(bench.work / "submit.lua", SUBMIT_BODY)
        task = httpx.post(f"{api}/api/v1/tasks", json=SUBMIT_BODY, headers=AUTH).json()
        # The minimal prototypes of poll and submit, measured in the same rounds.
        _, floor_url = poll_floor_server(bench, env, task["id"])
        _, submit_floor = submit_floor_server(bench, env)

        ui.log("[bold]metric 1: submit efficiency[/bold]")
        submit = rounds(
            "submit efficiency",
            lambda: _wrk_sample(f"{api}/api/v1/tasks", options, script=script),
            lambda: raw_enqueue_rate(broker, options.enqueue_count),
            options.rounds,
            peers={
                "fastapi_group_commit_floor": lambda: _wrk_sample(
                    submit_floor, options, script=script
                )
            },
        )
        # Its own API and a dispatcher, the dispatcher's work counted in the same cores.
        outbox_env = {**env, "TASKDOCK_PUBLISH_ON_SUBMIT": "false"}
        _, outbox_api = bench.api(outbox_env, name="api-outbox")
        bench.dispatcher(outbox_env)
        ui.log("[bold]metric 1b: submit efficiency, the dispatcher publishing[/bold]")
        submit_outbox = rounds(
            "submit efficiency (dispatcher publishes)",
            lambda: _outbox_sample(bench, f"{outbox_api}/api/v1/tasks", options, script),
            lambda: raw_enqueue_rate(broker, options.enqueue_count),
            options.rounds,
        )
        ui.log("[bold]metric 4: poll efficiency[/bold]")
        poll = rounds(
            "poll efficiency",
            lambda: _wrk_sample(f"{api}/api/v1/tasks/{task['id']}", options),
            lambda: _wrk_sample(f"{hello}/hello", options),
            options.rounds,
            peers={"fastapi_psycopg_floor": lambda: _wrk_sample(floor_url, options)},
        )
        ui.log("[bold]throughput versus concurrency[/bold]")
        concurrency = sweep(bench, api, hello, task["id"], options)
    return {
        "submit_efficiency": submit,
        "submit_efficiency_outbox": submit_outbox,
        "poll_efficiency": poll,
        "concurrency_sweep": concurrency,
    }


if __name__ == "__main__":
    print(json.dumps(run(Options.quick_run()), indent=2))
