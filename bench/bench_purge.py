"""Metric 8: the API's latency while the retention purge deletes, against no purge at all.

Each round seeds `purge_rows` expired SUCCEEDED records (one INSERT ... SELECT generate_series)
and polls one task by id under wrk, once while `taskdock purge` deletes them (the dispatcher's
batches, run to the end) and once with nothing purging (A B A B). The figures are wrk's p50 and
p99 on both sides and their ratio, and the purge's rate in records per second.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import httpx
from sqlalchemy import text

from bench.common import AUTH, Bench, Options, bench_world, rounds, ui, wrk

SEED_SQL = """
INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts,
                  deliveries, run_after, owner, created_at, updated_at, finished_at)
SELECT gen_random_uuid(), 'bench.noop', '{}', 'SUCCEEDED', 'default', 0, 1, 1, 1,
       now() - interval '30 days', '', now() - interval '30 days', now(),
       now() - interval '30 days' + (n % 1000) * interval '1 second'
FROM generate_series(1, :count) AS n
"""


def rows_for(options: Options) -> int:
    return 20_000 if options.quick else 200_000


def estimate(options: Options) -> float:
    return 20 + options.rounds * 2 * (options.seconds + 10)


def seed(bench: Bench, count: int) -> None:
    with bench.engine.begin() as connection:
        connection.execute(text(SEED_SQL), {"count": count})
    with bench.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE task"))


def run(options: Options) -> dict[str, Any]:
    count = rows_for(options)
    with bench_world("purge") as bench:
        env = bench.env()
        _, api = bench.api(env)
        created = httpx.post(
            f"{api}/api/v1/tasks",
            json={"type": "bench.noop", "payload": {}},
            headers=AUTH,
            timeout=10,
        )
        created.raise_for_status()
        url = f"{api}/api/v1/tasks/{created.json()['id']}"

        def poll(purging: bool) -> dict[str, Any]:
            seed(bench, count)
            purge = None
            started = time.perf_counter()
            if purging:
                purge = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "purge"],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            try:
                result = wrk(url, seconds=options.seconds, connections=options.connections)
            except BaseException:
                if purge is not None:
                    purge.kill()
                    purge.wait()
                raise
            sample: dict[str, Any] = {
                "value": result.rate,
                "p50_ms": result.latency_ms.get("p50"),
                "p99_ms": result.latency_ms.get("p99"),
            }
            if purge is not None:
                output, _ = purge.communicate(timeout=600)
                seconds = time.perf_counter() - started
                if purge.returncode != 0:
                    raise RuntimeError(f"taskdock purge failed:\n{output}")
                sample["purge_seconds"] = round(seconds, 2)
                sample["purged_per_second"] = round(count / seconds, 1)
                sample["purge_outlasted_wrk"] = seconds > options.seconds
            else:
                # The same rows go between rounds, outside the measurement.
                subprocess.run(
                    [sys.executable, "-m", "app.cli", "purge"], env=env, check=True, timeout=600
                )
            return sample

        ui.log(f"[bold]metric 8: API latency during a purge of {count:,} records[/bold]")
        result = rounds(
            "poll during a purge",
            lambda: poll(True),
            lambda: poll(False),
            options.rounds,
            keys=("value", "p50_ms", "p99_ms"),
        )
        result["rows"] = count
        return result
