"""Metric 7: footprint. Start-up time, idle memory, and memory after many tasks.

- Start-up: seconds from spawning `taskdock api` to /health/ready answering 200, and from
  spawning `taskdock worker` to its heartbeat file appearing (it beats only while consuming).
- Idle: RSS and PSS (shared pages split among sharers) of the API process, and of the worker's
  main process plus its prefork children, a few seconds after ready.
- Under load: Options.footprint_tasks bench.noop tasks through API, dispatcher and worker
  (wrk in 5-second bursts while fewer than MAX_BACKLOG are unfinished), RSS sampled every
  second; growth is reported as the slope of RSS against tasks done over the second half of
  the run, which should be flat. Time-capped at Options.footprint_max_seconds.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from bench.bench_e2e import UNFINISHED, drained
from bench.common import (
    Bench,
    Options,
    Proc,
    bench_world,
    memory,
    submit_script,
    ui,
    wrk,
)

SETTLE_SECONDS = 3.0
BURST_SECONDS = 5.0
MAX_BACKLOG = 1000


def estimate(options: Options, rate: float = 60.0) -> float:
    startup = options.startup_repeats * 2 * (8 + SETTLE_SECONDS)
    load = min(options.footprint_max_seconds, options.footprint_tasks / rate)
    return 20 + startup + load + 20


def tree_memory(proc: Proc) -> dict[str, int]:
    pids = proc.tree()
    rss = pss = 0
    for pid in pids:
        one_rss, one_pss = memory(pid)
        rss += one_rss
        pss += one_pss
    return {"rss": rss, "pss": pss, "processes": len(pids)}


def startup(bench: Bench, options: Options) -> dict[str, Any]:
    env = bench.env()
    progress = ui.task("footprint: start-up", options.startup_repeats * 2)
    api_runs: list[dict[str, Any]] = []
    worker_runs: list[dict[str, Any]] = []
    for _ in range(options.startup_repeats):
        proc, _ = bench.api(env)
        seconds = time.monotonic() - proc.started_at
        time.sleep(SETTLE_SECONDS)
        api_runs.append({"ready_seconds": round(seconds, 3), **tree_memory(proc)})
        proc.stop()
        ui.advance(progress)
        worker = bench.worker(env, options.concurrency)
        seconds = time.monotonic() - worker.started_at
        time.sleep(SETTLE_SECONDS)
        worker_runs.append({"ready_seconds": round(seconds, 3), **tree_memory(worker)})
        worker.stop()
        ui.advance(progress)
        bench.stop_all()
    ui.log(
        f"  start-up: API {api_runs[-1]['ready_seconds']:.2f} s, "
        f"worker {worker_runs[-1]['ready_seconds']:.2f} s"
    )
    return {"api": summarise(api_runs), "worker": summarise(worker_runs)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": runs,
        "ready_seconds_median": round(statistics.median(run["ready_seconds"] for run in runs), 3),
        "idle_rss_mb": round(statistics.median(run["rss"] for run in runs) / 2**20, 1),
        "idle_pss_mb": round(statistics.median(run["pss"] for run in runs) / 2**20, 1),
        "processes": runs[-1]["processes"],
    }


def slope_per_1000(samples: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares MB per 1,000 tasks over the second half of the run."""
    half = [s for s in samples if s["done"] >= samples[-1]["done"] / 2]
    if len(half) < 3 or half[-1]["done"] == half[0]["done"]:
        return None
    xs = [s["done"] / 1000 for s in half]
    ys = [s[key] / 2**20 for s in half]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var
    return round(float(slope), 4)


def under_load(bench: Bench, options: Options) -> dict[str, Any]:
    env = bench.env()
    api, base = bench.api(env)
    bench.dispatcher(env)
    worker = bench.worker(env, options.concurrency)
    time.sleep(SETTLE_SECONDS)
    samples: list[dict[str, Any]] = []
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        api_mem, worker_mem = tree_memory(api), tree_memory(worker)
        done = int(bench.scalar("SELECT count(*) FROM task WHERE status = 'SUCCEEDED'"))
        samples.append(
            {
                "seconds": round(time.monotonic() - started, 1),
                "done": done,
                "api_rss": api_mem["rss"],
                "worker_rss": worker_mem["rss"],
                "worker_main_rss": memory(worker.pid)[0],
                "worker_pss": worker_mem["pss"],
            }
        )

    def sampler() -> None:
        while not stop.wait(1.0):
            sample()

    sample()
    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    script = submit_script(bench.work / "noop.lua", {"type": "bench.noop", "payload": {}})
    progress = ui.task("footprint: tasks", options.footprint_tasks)
    capped = False
    submitted = 0
    while submitted < options.footprint_tasks:
        if time.monotonic() - started > options.footprint_max_seconds:
            capped = True
            break
        # Submit only while the backlog is short, so the final drain fits in the time budget.
        if bench.scalar(UNFINISHED) > MAX_BACKLOG:
            time.sleep(0.5)
            continue
        result = wrk(
            f"{base}/api/v1/tasks",
            seconds=BURST_SECONDS,
            connections=options.connections,
            script=script,
        )
        submitted += result.requests
        ui.progress.update(progress, completed=min(submitted, options.footprint_tasks))
    drained(bench)
    stop.set()
    thread.join()
    sample()
    first, last = samples[0], samples[-1]
    if capped:
        ui.log(f"  footprint: time cap reached after {submitted:,} tasks")
    return {
        "tasks_target": options.footprint_tasks,
        "tasks_submitted": submitted,
        "tasks_done": last["done"],
        "capped_by_time": capped,
        "seconds": round(time.monotonic() - started, 1),
        "api_rss_mb": {
            "idle": round(first["api_rss"] / 2**20, 1),
            "after": round(last["api_rss"] / 2**20, 1),
            "max": round(max(s["api_rss"] for s in samples) / 2**20, 1),
        },
        "worker_rss_mb": {
            "idle": round(first["worker_rss"] / 2**20, 1),
            "after": round(last["worker_rss"] / 2**20, 1),
            "max": round(max(s["worker_rss"] for s in samples) / 2**20, 1),
        },
        "api_rss_mb_per_1000_tasks_second_half": slope_per_1000(samples, "api_rss"),
        "worker_rss_mb_per_1000_tasks_second_half": slope_per_1000(samples, "worker_rss"),
        "samples": samples,
    }


def run(options: Options) -> dict[str, Any]:
    with bench_world("footprint") as bench:
        ui.log("[bold]metric 7: footprint[/bold]")
        result = startup(bench, options)
        result["load"] = under_load(bench, options)
        load = result["load"]
        ui.log(
            f"  {load['tasks_done']:,} tasks: API RSS {load['api_rss_mb']['idle']} → "
            f"{load['api_rss_mb']['after']} MB, worker RSS {load['worker_rss_mb']['idle']} → "
            f"{load['worker_rss_mb']['after']} MB"
        )
        return result
