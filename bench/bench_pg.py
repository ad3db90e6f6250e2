"""Metric 6: the PostgreSQL ceiling, and metric 1's submit rate as a fraction of it.

pgbench (same client count as metric 1's wrk connections, 2 threads) runs a script that
inserts one task-shaped row per transaction into the real `task` table of the migrated
scratch database: the columns a submission writes, with the same payload. It alternates with
wrk submitting through the API on the same database (A B A B), so the fraction is taken
under the same conditions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from bench.bench_api import SUBMIT_BODY
from bench.common import Bench, Options, bench_world, rounds, submit_script, ui, wrk

INSERT_SQL = """\
INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts,
                  deliveries, run_after, owner, request_id, created_at, updated_at, queued_at)
VALUES (gen_random_uuid(), 'process_data', '{payload}'::json, 'QUEUED', 'default', 5, 1, 4,
        0, now(), '', md5(random()::text), now(), now(), now());
"""


def estimate(options: Options) -> float:
    return 10 + options.rounds * 2 * (options.seconds + 1)


def pgbench(bench: Bench, script: Path, options: Options) -> dict[str, Any]:
    url = make_url(bench.database_url)
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = url.password
    args = [
        "pgbench",
        "-n",
        "-c",
        str(options.connections),
        "-j",
        "2",
        "-T",
        str(max(1, round(options.seconds))),
        "-f",
        str(script),
        "-h",
        url.host or "127.0.0.1",
        "-p",
        str(url.port or 5432),
        "-U",
        url.username or "postgres",
        url.database or "",
    ]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    if tps is None:
        raise RuntimeError(f"cannot read pgbench's output:\n{out}")
    return {
        "value": float(tps.group(1)),
        "latency_ms": float(latency.group(1)) if latency else None,
    }


def run(options: Options) -> dict[str, Any]:
    with bench_world("pg") as bench:
        env = bench.env()
        _, api = bench.api(env)
        script = bench.work / "insert_task.sql"
        script.write_text(INSERT_SQL.format(payload=json.dumps(SUBMIT_BODY["payload"])))
        lua = submit_script(bench.work / "submit.lua", SUBMIT_BODY)

        def submit() -> dict[str, Any]:
            result = wrk(
                f"{api}/api/v1/tasks",
                seconds=options.seconds,
                connections=options.connections,
                script=lua,
            )
            return {"value": result.rate, "latency_ms": result.latency_ms}

        ui.log("[bold]metric 6: the PostgreSQL ceiling (pgbench)[/bold]")
        result = rounds(
            "postgres ceiling", submit, lambda: pgbench(bench, script, options), options.rounds
        )
        result["script"] = INSERT_SQL
        result["clients"] = options.connections
        return result
