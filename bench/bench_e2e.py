"""Metrics 2, 3 and 5: end-to-end throughput, dispatch latency, CPU per 1,000 tasks.

2. End-to-end throughput: bench.noop tasks submitted over HTTP by wrk (Options.connections)
   for Options.seconds while the API, the dispatcher and a worker run; the rate is the
   SUCCEEDED count ÷ (last finished_at - first created_at). Baseline: the raw Celery drain
   rate, Options.drain_count `.delay()`s queued while the raw worker is not consuming, then
   (N - 1) ÷ (last start - first start), with the worker's consumer switched on and off by
   Celery's remote control (add_consumer / cancel_consumer). On Redis and on RabbitMQ.
3. Dispatch latency (Redis): scheduled submission → task start, open loop at half the raw
   drain rate measured in metric 2, p50 and p99 ÷ the same for `.delay()` → start; and again
   at half taskdock's own throughput, where it is not overloaded.
5. CPU per 1,000 tasks (Redis, from metric 2's rounds): utime+stime from /proc of the API,
   the dispatcher, the worker with its pool children, redis-server and the PostgreSQL backends
   of the scratch database ÷ the raw worker's tree + redis-server + the producing process.

End-to-end's floor (metrics 2, 3 and 5, on Redis and RabbitMQ): the least a durable, recorded
task costs with FastAPI, psycopg and Celery, loaded and measured as taskdock is, in the same
rounds: bench.submit_floor_app serving the submissions and a plain Celery worker running them
with a run's two writes (bench.e2e_floor). taskdock ÷ it is what taskdock adds.

Peers (metrics 2 and 5 on Redis): what users who do not pick taskdock run, Celery recording
results with its own result backends (PEERS). Each is the raw drain again, with the same app
and flags, plus a result backend: Redis (db 2 of the benchmark's redis-server), and SQL on a
scratch PostgreSQL database of its own, with task_track_started; that one's CPU includes the
PostgreSQL backends serving its database. They run in the same rounds, after the raw drain.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from bench import raw_celery
from bench.bench_api import submit_floor_server
from bench.common import (
    ROOT,
    Bench,
    CpuMeter,
    Options,
    Proc,
    bench_world,
    rabbit_available,
    rabbit_vhost,
    redis_client,
    rounds,
    scratch_database,
    submit_script,
    ui,
    wait_for,
    wrk,
)
from bench.tasks import LATENCY_KEY

NOOP_BODY: dict[str, Any] = {"type": "bench.noop", "payload": {}}
UNFINISHED = "SELECT count(*) FROM task WHERE status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"
# The queue end-to-end's floor records its tasks in (bench.submit_floor_app.QUEUE).
FLOOR_QUEUE = "submit-floor"
DRAIN_TIMEOUT = 900.0
# The peers, by their key in the results: Celery with one of its own result backends.
PEERS = {
    "celery_redis_backend": "Celery + Redis result backend",
    "celery_sql_backend": "Celery + SQL result backend",
    "celery_two_writes": "the minimal prototype: Celery + a claim and a durable outcome per task",
    "e2e_floor": "end-to-end's floor: submit's floor + a worker making a run's two writes",
}
RESULTS_DB = 2  # the Redis result backend's database on the benchmark's redis-server


def estimate(options: Options) -> float:
    """Seconds, from runs on a shared 2-core machine (raw enqueue ~400/s, drain ~300/s; the
    peers enqueue as fast and drain at ~300/s with Redis results, ~100/s with SQL)."""
    pair = options.seconds + 3 + options.drain_count / 400 + options.drain_count / 300 + 3
    peers = 2 * options.drain_count / 400 + options.drain_count / 300 + options.drain_count / 100
    peers += 6
    # End-to-end's floor: one more submit round, as taskdock's.
    floor = options.seconds + 3 + 5
    per_broker = 25 + options.rounds * pair
    one_latency = options.latency_seconds + options.max_lag + 5
    # Three latency points on Redis (100/s, half the raw drain rate, half taskdock's own peak),
    # each taskdock, .delay() and the floor; one more, without the floor, with the dispatcher
    # publishing.
    latency = 3 * options.rounds * 3 * one_latency + options.rounds * 2 * one_latency
    brokers = 3 if options.rabbitmq else 2
    floors = options.rounds * floor * (2 if options.rabbitmq else 1)
    return per_broker * brokers + latency + options.rounds * peers + floors


def percentile(values: list[float], percent: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(percent / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class RawConsumer:
    """Switches a raw worker's consumer on and off, so a whole queue can be drained at once."""

    def __init__(self, broker: str, name: str = "raw") -> None:
        self.app = Celery("bench-control", broker=broker)
        self.name = name
        self.destination = [f"{name}@bench"]

    def _call(self, method: str) -> None:
        control = self.app.control
        replies = getattr(control, method)(
            raw_celery.queue(self.name), destination=self.destination, reply=True, timeout=10
        )
        if not replies:
            raise RuntimeError(f"the {self.name} worker did not answer {method}")

    def pause(self) -> None:
        self._call("cancel_consumer")

    def resume(self) -> None:
        self._call("add_consumer")

    def close(self) -> None:
        self.app.close()


Groups = dict[str, Callable[[], Iterable[int]]]


@dataclass
class Drain:
    """A plain Celery worker that drains its own queue when switched on: raw Celery or a peer."""

    consumer: RawConsumer
    groups: Groups  # whose CPU counts, besides the producing process
    env: dict[str, str]  # the producer's
    result_settings: dict[str, Any]  # what it changes in the mirrored settings


@dataclass(frozen=True)
class PeerBackend:
    """Where a peer records its results: Celery's result backend `url`, or with `record` the
    two writes of issue 13's minimal prototype (bench.raw_celery); `database` is a scratch
    database whose PostgreSQL backends count toward its CPU."""

    url: str | None
    database: str | None = None
    record: bool = False


@dataclass
class Floor:
    """End-to-end's floor, served: where it takes submissions, and whose CPU counts."""

    url: str
    api: Proc
    worker: Proc
    groups: Groups


@dataclass
class Stack:
    bench: Bench
    broker: str
    api: str
    taskdock_groups: Groups
    raw: Drain
    peers: dict[str, Drain]
    counters: Any
    floor: Floor | None = None

    def close(self) -> None:
        for drain in (self.raw, *self.peers.values()):
            drain.consumer.close()


def start_drain(
    bench: Bench,
    broker: str,
    options: Options,
    *,
    name: str = "raw",
    backend: PeerBackend | None = None,
    local_broker: bool,
) -> Drain:
    """A raw worker, paused; with `backend`, a peer recording its results there."""
    extra: dict[str, str] = {}
    if backend is not None and backend.url is not None:
        key = "BENCH_RECORD_URL" if backend.record else "BENCH_RESULT_BACKEND"
        extra[key] = backend.url
    worker = bench.raw_worker(broker, options.concurrency, name, **extra)
    consumer = RawConsumer(broker, name)
    consumer.pause()
    groups: Groups = {"worker": worker.tree}
    if local_broker:
        redis: Proc = bench.redis_proc
        groups["broker"] = redis.tree
    if backend is not None and backend.database is not None:
        database = backend.database
        groups["database"] = lambda: bench.backend_pids(database)
    return Drain(
        consumer,
        groups,
        bench.env(BENCH_BROKER_URL=broker, BENCH_RAW_NAME=name, **extra),
        raw_celery.result_settings(backend.url if backend and not backend.record else None),
    )


def start_floor(bench: Bench, broker: str, options: Options, *, local_broker: bool) -> Floor:
    """End-to-end's floor on `broker` and the scratch database: its app and its worker."""
    api, url = submit_floor_server(bench, bench.env(broker))
    worker = bench.raw_worker(broker, options.concurrency, "floor", module="bench.e2e_floor")
    groups = cpu_groups(bench, local_broker=local_broker, api=api, worker=worker)
    return Floor(url, api, worker, groups)


def cpu_groups(bench: Bench, *, local_broker: bool, **procs: Proc) -> Groups:
    """Whose CPU counts: `procs` with their children, the PostgreSQL backends serving the
    scratch database, and the world's redis-server when it is the broker."""
    groups: Groups = {name: proc.tree for name, proc in procs.items()}
    groups["database"] = bench.backend_pids
    if local_broker:
        groups["broker"] = bench.redis_proc.tree
    return groups


def start_stack(
    bench: Bench,
    broker: str,
    options: Options,
    *,
    local_broker: bool,
    peers: dict[str, PeerBackend] | None = None,
    floor: bool = False,
    **extra: str,
) -> Stack:
    env = bench.env(broker, **extra)
    api_proc, api = bench.api(env)
    dispatcher = bench.dispatcher(env)
    worker = bench.worker(env, options.concurrency)
    taskdock_groups = cpu_groups(
        bench, local_broker=local_broker, api=api_proc, dispatcher=dispatcher, worker=worker
    )
    raw = start_drain(bench, broker, options, local_broker=local_broker)
    drains = {
        peer: start_drain(
            bench,
            broker,
            options,
            name=peer.replace("_", "-"),
            backend=backend,
            local_broker=local_broker,
        )
        for peer, backend in (peers or {}).items()
    }
    return Stack(
        bench,
        broker,
        api,
        taskdock_groups,
        raw,
        drains,
        redis_client(f"{bench.redis_url}/1"),
        start_floor(bench, broker, options, local_broker=local_broker) if floor else None,
    )


def drained(bench: Bench) -> None:
    wait_for(lambda: bench.scalar(UNFINISHED) == 0, timeout=DRAIN_TIMEOUT, what="tasks", every=0.1)


def submit_round(bench: Bench, url: str, options: Options) -> None:
    """wrk submitting no-op tasks to `url` for one round, then every task they made finished."""
    script = submit_script(bench.work / "noop.lua", NOOP_BODY)
    wrk(
        url,
        seconds=options.seconds,
        connections=options.connections,
        script=script,
    )
    drained(bench)


def taskdock_throughput(stack: Stack, options: Options) -> dict[str, Any]:
    return recorded_throughput(stack, options, stack.taskdock_groups)


def floor_throughput(stack: Stack, floor: Floor, options: Options) -> dict[str, Any]:
    return recorded_throughput(stack, options, floor.groups, floor.url)


def recorded_throughput(
    stack: Stack, options: Options, groups: Groups, url: str | None = None
) -> dict[str, Any]:
    """Metric 2 of taskdock (or, at `url`, of end-to-end's floor): one submit round, from the
    first submission's record to the last outcome's."""
    bench = stack.bench
    before = bench.scalar("SELECT max(created_at) FROM task")
    meter = CpuMeter(groups).start()
    submit_round(bench, url or f"{stack.api}/api/v1/tasks", options)
    cpu = meter.stop()
    done, failed, first, last = bench.row(
        "SELECT count(*) FILTER (WHERE status = 'SUCCEEDED'),"
        " count(*) FILTER (WHERE status <> 'SUCCEEDED'), min(created_at), max(finished_at)"
        " FROM task WHERE type = 'bench.noop' AND (queue = :floor) = :is_floor"
        " AND (CAST(:before AS timestamptz) IS NULL OR created_at > :before)",
        before=before,
        floor=FLOOR_QUEUE,
        is_floor=url is not None,
    )
    seconds = (last - first).total_seconds()
    return cpu_sample(done / seconds, done, cpu, failed=failed, seconds=seconds)


def raw_throughput(stack: Stack, drain: Drain, options: Options) -> dict[str, Any]:
    """The drain rate of raw Celery or of a peer: N queued, then its consumer switched on."""
    count = options.drain_count
    stack.counters.delete(raw_celery.COUNT_KEY, raw_celery.FIRST_KEY, raw_celery.DONE_KEY)
    meter = CpuMeter(drain.groups).start()
    produced = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bench.raw_celery", "produce", str(count)],
            env=drain.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    drain.consumer.resume()
    item = wait_done(stack.counters, count)
    drain.consumer.pause()
    cpu = meter.stop()
    cpu["producer"] = round(float(produced["cpu"]), 3)
    first = float(stack.counters.get(raw_celery.FIRST_KEY))
    seconds = float(item[1]) - first
    return cpu_sample(
        (count - 1) / seconds, count, cpu, seconds=seconds, enqueue_rate=count / produced["seconds"]
    )


def wait_done(counters: Any, count: int) -> Any:
    """The last task's (key, start time); fails if the count stops moving for 30 s."""
    last, still_since = -1, time.monotonic()
    while True:
        item = counters.blpop(raw_celery.DONE_KEY, timeout=1)
        if item is not None:
            return item
        seen = int(counters.get(raw_celery.COUNT_KEY) or 0)
        if seen != last:
            last, still_since = seen, time.monotonic()
        elif time.monotonic() - still_since > 30:
            raise RuntimeError(f"the raw worker stopped at {seen} of {count} tasks")


def cpu_sample(rate: float, tasks: int, cpu: dict[str, float], **extra: Any) -> dict[str, Any]:
    per_1000 = {name: round(value / tasks * 1000, 4) for name, value in cpu.items()}
    return {
        "value": rate,
        "tasks": tasks,
        "cpu_seconds": cpu,
        "cpu_per_1000": per_1000,
        "cpu_per_1000_total": round(sum(per_1000.values()), 4),
        **extra,
    }


def latencies(stack: Stack, expected: int) -> list[float]:
    wait_for(
        lambda: stack.counters.llen(LATENCY_KEY) >= expected,
        timeout=DRAIN_TIMEOUT,
        what=f"{expected} tasks to start",
        every=0.1,
    )
    return [float(value) for value in stack.counters.lrange(LATENCY_KEY, 0, -1)]


def latency_sample(values: list[float], sent: dict[str, float], rate: float) -> dict[str, Any]:
    return {
        "p50": percentile(values, 50) * 1000,
        "p99": percentile(values, 99) * 1000,
        "mean_ms": statistics.fmean(values) * 1000,
        "offered_rate": rate,
        "sent": int(sent["sent"]),
        "achieved_rate": sent["sent"] / sent["seconds"],
        "fell_behind": bool(sent["lagged"]),
    }


def taskdock_latency(
    stack: Stack, options: Options, rate: float, url: str | None = None
) -> dict[str, Any]:
    """Metric 3 of taskdock (or, at `url`, of end-to-end's floor) at `rate`."""
    stack.counters.delete(LATENCY_KEY)
    args = [
        sys.executable,
        "-m",
        "bench.loadgen",
        url or f"{stack.api}/api/v1/tasks",
        str(rate),
        str(options.latency_seconds),
        str(options.max_lag),
    ]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    sent = json.loads(out.stdout.splitlines()[-1])
    values = latencies(stack, int(sent["accepted"]))
    drained(stack.bench)
    return latency_sample(values, sent, rate)


def raw_latency(stack: Stack, options: Options, rate: float) -> dict[str, Any]:
    stack.counters.delete(LATENCY_KEY)
    stack.raw.consumer.resume()
    try:
        args = [
            sys.executable,
            "-m",
            "bench.raw_celery",
            "pace",
            str(rate),
            str(options.latency_seconds),
            str(options.max_lag),
        ]
        out = subprocess.run(
            args, env=stack.raw.env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        sent = json.loads(out.stdout.splitlines()[-1])
        values = latencies(stack, int(sent["sent"]))
    finally:
        stack.raw.consumer.pause()
    return latency_sample(values, sent, rate)


def cpu_summary(throughput: dict[str, Any]) -> dict[str, Any]:
    """Metric 5 from metric 2's rounds: medians per component and of the totals; for each
    peer the same under "peers", with taskdock's total ÷ the peer's."""
    runs = throughput["rounds"]
    out: dict[str, Any] = {}
    for side in ("taskdock", "baseline"):
        out[side], out[f"{side}_total"] = cpu_medians([run[side] for run in runs])
    out["ratio"] = round(out["taskdock_total"] / out["baseline_total"], 3)
    for peer in throughput.get("peers", {}):
        components, total = cpu_medians([run["peers"][peer] for run in runs])
        out.setdefault("peers", {})[peer] = {
            "cpu_per_1000": components,
            "total": total,
            "ratio": round(out["taskdock_total"] / total, 3),
        }
    out["unit"] = "CPU seconds per 1,000 tasks"
    return out


def cpu_medians(samples: list[dict[str, Any]]) -> tuple[dict[str, float], float]:
    """One side's median CPU per 1,000 tasks by component, and the median of its totals."""
    components = sorted({name for sample in samples for name in sample["cpu_per_1000"]})
    medians = {
        name: round(statistics.median(s["cpu_per_1000"].get(name, 0.0) for s in samples), 4)
        for name in components
    }
    return medians, round(statistics.median(s["cpu_per_1000_total"] for s in samples), 4)


def latency_point(stack: Stack, options: Options, rate: float, label: str) -> dict[str, Any]:
    """Metric 3 at one offered rate: taskdock and `.delay()` in alternating rounds."""
    floor = stack.floor
    result = rounds(
        label,
        lambda: taskdock_latency(stack, options, rate),
        lambda: raw_latency(stack, options, rate),
        options.rounds,
        keys=("p50", "p99"),
        unit=" ms",
        peers=(
            {"e2e_floor": lambda: taskdock_latency(stack, options, rate, floor.url)}
            if floor is not None
            else None
        ),
    )
    result["offered_rate"] = rate
    return result


def broker_suite(
    bench: Bench,
    broker: str,
    options: Options,
    *,
    name: str,
    local: bool,
    specified_rate: bool = True,
    peers: dict[str, PeerBackend] | None = None,
    floor: bool = False,
    **extra: str,
) -> dict[str, Any]:
    """Metric 2 (and the peers' throughput); with a local broker also 5 and 3 (at the
    specified rate, and at half taskdock's own peak); with `floor`, end-to-end's floor beside
    taskdock in each. `extra` is more taskdock environment."""
    stack = start_stack(
        bench, broker, options, local_broker=local, peers=peers, floor=floor, **extra
    )
    try:
        ui.log(f"[bold]metric 2: end-to-end throughput ({name})[/bold]")
        measures: dict[str, Callable[[], dict[str, Any]]] = {
            peer: functools.partial(raw_throughput, stack, drain, options)
            for peer, drain in stack.peers.items()
        }
        if stack.floor is not None:
            measures["e2e_floor"] = functools.partial(floor_throughput, stack, stack.floor, options)
        throughput = rounds(
            f"e2e throughput ({name})",
            lambda: taskdock_throughput(stack, options),
            lambda: raw_throughput(stack, stack.raw, options),
            options.rounds,
            peers=measures,
        )
        result: dict[str, Any] = {
            "throughput": throughput,
            "mirrored_settings": raw_celery.mirrored_settings(broker),
        }
        if stack.peers:
            result["peer_settings"] = {
                peer: drain.result_settings for peer, drain in stack.peers.items()
            }
        if local:
            result["cpu"] = cpu_summary(throughput)
            ui.log(
                f"  metric 5: {result['cpu']['taskdock_total']:.3g} vs "
                f"{result['cpu']['baseline_total']:.3g} CPU s per 1,000 tasks"
                + "".join(
                    f"; {peer} {found['total']:.3g}"
                    for peer, found in result["cpu"].get("peers", {}).items()
                )
            )
            if specified_rate:
                rate = throughput["baseline_median"] / 2
                ui.log(f"[bold]metric 3: dispatch latency at {rate:,.0f}/s ({name})[/bold]")
                latency = latency_point(stack, options, rate, f"dispatch latency ({name})")
                latency["taskdock_fell_behind"] = any(
                    run["taskdock"]["fell_behind"] for run in latency["rounds"]
                )
                result["latency"] = latency
                # Issue 13's point: a steady 100/s, whatever the machine's drain rate.
                ui.log(f"[bold]metric 3: dispatch latency at 100/s ({name})[/bold]")
                result["latency_100"] = latency_point(
                    stack, options, 100.0, f"dispatch latency at 100/s ({name})"
                )
            # The specified rate overloads taskdock whenever its throughput is below half the
            # raw drain rate; a second point, at half taskdock's own peak, shows its latency
            # without a growing backlog.
            own = throughput["taskdock_median"] / 2
            ui.log(f"[bold]metric 3b: dispatch latency at {own:,.0f}/s ({name})[/bold]")
            result["latency_unloaded"] = latency_point(
                stack, options, own, f"dispatch latency at half taskdock's peak ({name})"
            )
        return result
    finally:
        stack.close()
        bench.stop_all()


def run(options: Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # The SQL peer's results go to a scratch database of its own on the same PostgreSQL.
    with (
        bench_world("e2e") as bench,
        scratch_database() as (results_url, results_name),
        scratch_database() as (record_url, record_name),
    ):
        peers = {
            "celery_redis_backend": PeerBackend(f"{bench.redis_url}/{RESULTS_DB}"),
            "celery_sql_backend": PeerBackend(f"db+{results_url}", results_name),
            "celery_two_writes": PeerBackend(record_url, record_name, record=True),
        }
        out["redis"] = broker_suite(
            bench,
            f"{bench.redis_url}/0",
            options,
            name="redis",
            local=True,
            peers=peers,
            floor=True,
        )
    with bench_world("e2e-outbox") as bench:
        # The same on Redis with the dispatcher publishing; taskdock is overloaded at the
        # specified rate here too, so only its own half-peak point is taken.
        out["redis_outbox"] = broker_suite(
            bench,
            f"{bench.redis_url}/0",
            options,
            name="redis, dispatcher publishes",
            local=True,
            specified_rate=False,
            TASKDOCK_PUBLISH_ON_SUBMIT="false",
        )
    if not options.rabbitmq:
        out["rabbitmq"] = {"skipped": "--no-rabbitmq"}
    elif not rabbit_available():
        out["rabbitmq"] = {"skipped": "no RabbitMQ on 127.0.0.1:5672 (or no rabbitmqctl)"}
        ui.log("  RabbitMQ not available: skipped")
    else:
        with (
            bench_world("e2e-rabbitmq") as bench,
            rabbit_vhost() as broker,
            scratch_database() as (record_url, record_name),
        ):
            peers = {"celery_two_writes": PeerBackend(record_url, record_name, record=True)}
            out["rabbitmq"] = broker_suite(
                bench, broker, options, name="rabbitmq", local=False, peers=peers, floor=True
            )
    return out


if __name__ == "__main__":
    started = time.monotonic()
    print(json.dumps(run(Options.quick_run()), indent=2, default=str))
    print(f"{time.monotonic() - started:.0f}s", file=sys.stderr)
