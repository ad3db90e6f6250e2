"""What bounds the targets: where the CPU of a request and of a task goes, from py-spy.

For each of poll (GET /api/v1/tasks/{id}), submit (POST /api/v1/tasks), their minimal
prototypes (bench/poll_floor_app.py, bench/submit_floor_app.py: what bounds each) and the
hello-world GET, wrk loads one server process while py-spy samples it and /proc counts its
CPU. py-spy keeps only samples of a thread holding the GIL (`--gil`): its idle-thread detection
counted threads asleep in Condition.wait on these machines, and the GIL holder is what runs
Python. Reported per request: CPU milliseconds; the share of samples by layer, the layer being
the package of the innermost frame (self time); the share of samples that pass through each of
taskdock's own functions (inclusive time); and the functions with the most self time. Code
that SQLAlchemy runs inside a greenlet (`AsyncSession.run_sync`) is sampled as a stack of its
own, rooted at the greenlet.
The raw `send_task` baseline is CPU-bound in one thread: its CPU per message is 1 / its rate.

The worker's side (where end-to-end's CPU goes, metrics 2 and 5): a taskdock worker (prefork,
the e2e concurrency) runs the no-op tasks wrk submits for one round, until every one has
finished, while one py-spy samples its Celery consumer (the prefork parent: delivery, acks,
the pool's bookkeeping), one each of its pool children (the runs: claim, job, outcome) and one
the API that took them. Reported per task: CPU milliseconds of each side, and the same shares
as for a request. The same again for end-to-end's floor (bench.e2e_floor: submit's floor and a
plain Celery worker making a run's two writes), the prototype that bounds metrics 2 and 3; and
both again on RabbitMQ when it is here.

py-spy needs ptrace: as root, or with kernel.yama.ptrace_scope = 0 and the same user. When it
cannot attach, the report says so and the CPU figures stand alone.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from bench.bench_api import (
    SUBMIT_BODY,
    hello_server,
    poll_floor_server,
    raw_enqueue_rate,
    submit_floor_server,
)
from bench.bench_e2e import FLOOR_QUEUE, start_floor, submit_round
from bench.common import (
    AUTH,
    Options,
    bench_world,
    cpu_seconds,
    descendants,
    rabbit_available,
    rabbit_vhost,
    submit_script,
    ui,
    wrk,
)

RATE_HZ = 250
TOP_FUNCTIONS = 15
# (layer, top-level packages). py-spy names a frame's file relative to its sys.path entry
# ("sqlalchemy/orm/session.py", "app/tasks/router.py"), so the first part is the package.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("taskdock (app/)", frozenset({"app"})),
    ("uvicorn, httptools, uvloop (HTTP server)", frozenset({"uvicorn", "httptools", "uvloop"})),
    (
        "starlette, FastAPI, anyio (routing, dependencies, middleware)",
        frozenset({"starlette", "fastapi", "anyio"}),
    ),
    ("pydantic (validation, serialisation)", frozenset({"pydantic", "pydantic_core"})),
    ("SQLAlchemy", frozenset({"sqlalchemy"})),
    ("greenlet (SQLAlchemy's asyncio bridge)", frozenset({"greenlet"})),
    ("psycopg (driver and its asyncio wait)", frozenset({"psycopg", "psycopg_binary"})),
    ("redis-py, limits (broker, rate limit)", frozenset({"redis", "limits"})),
    (
        "Celery, kombu, billiard (messages, pool)",
        frozenset({"celery", "kombu", "amqp", "vine", "billiard"}),
    ),
    ("prometheus_client (metrics)", frozenset({"prometheus_client"})),
    ("asyncio (event loop)", frozenset({"asyncio"})),
)
STDLIB = "logging, json, uuid, other stdlib"
UNKNOWN = "other"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


# The profiled servers, as the summary and the chart name them.
PROFILED = {
    "poll": "poll",
    "poll_floor": "poll's floor",
    "submit": "submit",
    "submit_floor": "submit's floor",
    "hello": "hello-world GET",
}


def layers_seen(profile: dict[str, Any]) -> list[str]:
    """Every layer any profiled server's samples fell in, in the order they first appear."""
    layers: list[str] = []
    for name in PROFILED:
        for layer in profile.get(name, {}).get("profile", {}).get("layers", {}):
            if layer not in layers:
                layers.append(layer)
    return layers


def estimate(options: Options) -> float:
    # The five servers' loads, raw send_task, then four worker profiles (taskdock and end-to-end's
    # floor, on Redis and on RabbitMQ), each a world of its own and one submit round.
    return 30 + 5 * (options.seconds + 4) + 15 + 4 * (30 + 2 * options.seconds)


def layer_of(path: str) -> str:
    top = path.split("/", 1)[0].removesuffix(".py")
    for name, packages in LAYERS:
        if top in packages:
            return name
    return STDLIB if top in sys.stdlib_module_names else UNKNOWN


def parse_raw(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) format: `frame;frame;… count`, outermost frame first."""
    samples = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = FRAME.match(frame)
            if match is None:
                frames.append((frame, ""))  # a thread's name, "process 123", …
            else:
                frames.append((match["function"], match["file"]))
        samples.append((frames, int(count)))
    return samples


def breakdown(text: str) -> dict[str, Any]:
    """Self time by layer, and inclusive time of taskdock's own functions (shares of samples)."""
    samples = parse_raw(text)
    total = sum(count for _, count in samples)
    if not total:
        return {"samples": 0, "layers": {}, "taskdock_inclusive": {}, "top_self": {}}
    layers: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in samples:
        located = [(function, path) for function, path in frames if path]
        layers[layer_of(located[-1][1]) if located else UNKNOWN] += count
        if located:
            own[f"{located[-1][1]}:{located[-1][0]}"] += count
        seen = set()
        for function, path in located:
            if path.startswith("app/") and path != "app/cli.py":  # cli: the process's root
                name = f"{path}:{function}"
                if name not in seen:
                    seen.add(name)
                    inclusive[name] += count
    return {
        "samples": total,
        "layers": {name: round(count / total, 4) for name, count in layers.most_common()},
        "taskdock_inclusive": {
            name: round(count / total, 4) for name, count in inclusive.most_common(10)
        },
        "top_self": {
            name: round(count / total, 4) for name, count in own.most_common(TOP_FUNCTIONS)
        },
    }


def spy_args(pid: int, raw: Path, seconds: float | None) -> list[str]:
    """py-spy recording `pid` into `raw`, for `seconds` or until SIGINT."""
    duration = ["--duration", str(int(seconds))] if seconds is not None else []
    return [
        str(Path(sys.executable).with_name("py-spy")),  # the dev extra installs it beside Python
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(RATE_HZ),
        *duration,
        "--format",
        "raw",
        "--nonblocking",
        "--gil",
        "--output",
        str(raw),
    ]


def profiled_load(
    pid: int, url: str, options: Options, work: Path, name: str, script: Path | None = None
) -> dict[str, Any]:
    """wrk on `url` while py-spy samples `pid`; CPU ms per request from /proc."""
    raw = work / f"{name}.pyspy.txt"
    seconds = options.seconds
    args = spy_args(pid, raw, seconds)
    spy_result: dict[str, Any] = {}

    def spy() -> None:
        try:
            done = subprocess.run(args, capture_output=True, text=True)
        except OSError as exc:
            spy_result["stderr"] = f"cannot run py-spy: {exc}"
            return
        spy_result["returncode"] = done.returncode
        spy_result["stderr"] = done.stderr[-500:]

    before = cpu_seconds(pid) or 0.0
    thread = threading.Thread(target=spy, daemon=True)
    thread.start()
    result = wrk(url, seconds=seconds, connections=options.connections, script=script)
    after = cpu_seconds(pid) or 0.0
    thread.join(timeout=seconds + 30)
    out: dict[str, Any] = {
        "rate": result.rate,
        "requests": result.requests,
        "cpu_ms_per_request": round(1000 * (after - before) / max(result.requests, 1), 4),
    }
    if spy_result.get("returncode") == 0 and raw.exists():
        out["profile"] = breakdown(raw.read_text())
    else:
        out["profile_error"] = spy_result.get("stderr") or "py-spy did not finish"
    return out


def profiled_worker(
    options: Options, broker: str | None = None, *, floor: bool = False
) -> dict[str, Any]:
    """A worker running the no-op tasks of one wrk round (on `broker`, else the world's
    Redis): the CPU per task of its consumer, its pool and the API that took them, and where
    py-spy saw it go. With `floor`, the same of end-to-end's floor (bench.e2e_floor)."""
    with bench_world("profile-worker") as bench:
        broker = broker or f"{bench.redis_url}/0"
        if floor:
            served = start_floor(bench, broker, options, local_broker=False)
            api, worker, url, queue = served.api, served.worker, served.url, FLOOR_QUEUE
        else:
            env = bench.env(broker)
            api, base = bench.api(env)
            worker = bench.worker(env, options.concurrency)
            url, queue = f"{base}/api/v1/tasks", "default"
        children = descendants(worker.pid)
        # The worker's main process is Celery's consumer; its children run the tasks.
        sides = {"api": [api.pid], "consumer": [worker.pid], "pool": children}
        spies = []
        for side, pids in sides.items():
            for pid in pids:
                raw = bench.work / f"worker-{side}-{pid}.pyspy.txt"
                spy = subprocess.Popen(
                    spy_args(pid, raw, None),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                spies.append((side, raw, spy))
        before = {pid: cpu_seconds(pid) or 0.0 for pids in sides.values() for pid in pids}
        submit_round(bench, url, options)
        cpu = {
            side: sum((cpu_seconds(pid) or 0.0) - before[pid] for pid in pids)
            for side, pids in sides.items()
        }
        texts: dict[str, list[str]] = {side: [] for side in sides}
        errors: list[str] = []
        for side, raw, spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
            _, stderr = spy.communicate(timeout=60)
            if raw.exists():
                texts[side].append(raw.read_text())
            else:
                errors.append(stderr.strip().splitlines()[-1] if stderr.strip() else "no output")
        tasks = int(
            bench.scalar(
                "SELECT count(*) FROM task WHERE type = 'bench.noop' AND queue = :queue",
                queue=queue,
            )
        )
        out: dict[str, Any] = {
            "tasks": tasks,
            "pool_processes": len(children),
            "cpu_ms_per_task": {
                side: round(1000 * seconds / max(tasks, 1), 4) for side, seconds in cpu.items()
            },
        }
        for side, found in texts.items():
            if found:
                out[side] = breakdown("\n".join(found))
        if errors:
            out["profile_error"] = errors[0]
        return out


# The worker profiles, by their key in the results: (broker, end-to-end's floor or taskdock).
WORKER_PROFILES = {
    "worker": ("redis", False),
    "worker_floor": ("redis", True),
    "worker_rabbitmq": ("rabbitmq", False),
    "worker_floor_rabbitmq": ("rabbitmq", True),
}


def profiled_workers(options: Options) -> dict[str, Any]:
    """taskdock's worker profile and end-to-end floor's, on Redis and (if here) RabbitMQ."""
    out: dict[str, Any] = {}
    for key, (broker, floor) in WORKER_PROFILES.items():
        if broker == "redis":
            out[key] = profiled_worker(options, floor=floor)
        elif options.rabbitmq and rabbit_available():
            with rabbit_vhost() as url:
                out[key] = profiled_worker(options, url, floor=floor)
    return out


def run(options: Options) -> dict[str, Any]:
    with bench_world("profile") as bench:
        ui.log("[bold]profiles: where the API's CPU goes[/bold]")
        env = bench.env()
        api, base = bench.api(env)
        hello_proc, hello = hello_server(bench, env, name="hello-profile")
        task = httpx.post(f"{base}/api/v1/tasks", json=SUBMIT_BODY, headers=AUTH).json()
        poll_floor, poll_floor_url = poll_floor_server(bench, env, task["id"])
        submit_floor, submit_floor_url = submit_floor_server(bench, env)
        script = submit_script(bench.work / "submit.lua", SUBMIT_BODY)
        progress = ui.task("profiles", 7)
        result: dict[str, Any] = {"rate_hz": RATE_HZ, "connections": options.connections}
        result["poll"] = profiled_load(
            api.pid, f"{base}/api/v1/tasks/{task['id']}", options, bench.work, "poll"
        )
        ui.advance(progress)
        result["poll_floor"] = profiled_load(
            poll_floor.pid, poll_floor_url, options, bench.work, "poll_floor"
        )
        ui.advance(progress)
        result["submit"] = profiled_load(
            api.pid, f"{base}/api/v1/tasks", options, bench.work, "submit", script
        )
        ui.advance(progress)
        result["submit_floor"] = profiled_load(
            submit_floor.pid, submit_floor_url, options, bench.work, "submit_floor", script
        )
        ui.advance(progress)
        result["hello"] = profiled_load(
            hello_proc.pid, f"{hello}/hello", options, bench.work, "hello"
        )
        ui.advance(progress)
        raw = raw_enqueue_rate(env["TASKDOCK_BROKER_URL"], options.enqueue_count)["value"]
        result["raw_send_task"] = {"rate": raw, "cpu_ms_per_message": round(1000 / raw, 4)}
        ui.advance(progress)
    # A world of its own: the requests profiled above queued tasks no worker ran.
    result.update(profiled_workers(options))
    ui.advance(progress)
    for name in PROFILED:
        ui.log(f"  {name}: {result[name]['cpu_ms_per_request']:.3f} ms CPU per request")
    for key in WORKER_PROFILES:
        if key in result:
            per_task = result[key]["cpu_ms_per_task"]
            ui.log(
                f"  {key}: API {per_task['api']:.3f}, consumer {per_task['consumer']:.3f},"
                f" pool {per_task['pool']:.3f} ms CPU per task"
            )
    return result
