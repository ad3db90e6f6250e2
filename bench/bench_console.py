"""The console's pages on a large table: server time of the list page and the overview.

`python -m bench.bench_console [--rows 1000000] [--repeat 15]`. The issue's bound: on a table of
1,000,000 tasks, the list page and the overview answer in under 300 ms. The rows are seeded by
one INSERT ... SELECT generate_series into a scratch PostgreSQL database (about a minute for a
million), with auth off: the console then shows every owner's tasks, its costliest view. Each
page is requested in-process (no network, no HTTP server), so the time is the app's and the
database's. Part of `make bench` (`--only console`; 100,000 rows with --quick); its figure is
absolute against the issue's bound, not a ratio: there is no peer console over a SQL record to
run beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from bench.common import ROOT, Options, now_stamp, scratch_database, write_json

PAGES = (
    "/console",
    "/console/live/overview",
    "/console/chart.svg",
    "/console/tasks",
    "/console/live/tasks",
    "/console/tasks?status=FAILED",
    "/console/tasks?type=sleep&status=QUEUED",
    "/console/tasks/{task_id}",
    # The bulk page's dry-run count: at most `limit` ids, by the (status, created_at) index.
    "/console/bulk?action=retry&status=FAILED&limit=1000",
    "/console/schedules",
)
BOUND_MS = 300.0

SEED = """
INSERT INTO task (id, type, payload, status, queue, priority, attempt, max_attempts, deliveries,
  run_after, published_at, owner, created_at, updated_at, queued_at, started_at, finished_at)
SELECT gen_random_uuid(), CASE WHEN g % 2 = 0 THEN 'sleep' ELSE 'process_data' END,
  json_build_object('user_id', g % 1000, 'seconds', g % 5),
  CASE WHEN g % 100 = 0 THEN 'FAILED' WHEN g % 50 = 0 THEN 'QUEUED' ELSE 'SUCCEEDED' END,
  'default', 0, 1, 3, 1, now() - make_interval(secs => g / 100.0), now(), 'owner-' || (g % 3),
  now() - make_interval(secs => g / 100.0), now(), now(), now(),
  CASE WHEN g % 50 = 0 AND g % 100 <> 0 THEN NULL ELSE now() - make_interval(secs => g / 100.0)
  END
FROM generate_series(1, :rows) g
"""


def measure(rows: int, repeat: int) -> dict[str, Any]:
    with scratch_database() as (url, _):
        os.environ.update(
            {
                "TASKDOCK_DATABASE_URL": url,
                "TASKDOCK_AUTH_ENABLED": "false",
                "TASKDOCK_LOG_LEVEL": "WARNING",
                "TASKDOCK_RATE_LIMIT_READ": "1000000/minute",
                "TASKDOCK_DATA_DIR": str(Path("/tmp") / "taskdock-bench-console"),
            }
        )
        from fastapi.testclient import TestClient

        from app.core.config import get_settings
        from app.core.db import configure, get_engine
        from app.db.migrate import upgrade
        from app.main import create_app

        settings = get_settings()
        configure(settings, role="api")
        upgrade(get_engine())
        engine = create_engine(url)
        started = time.monotonic()
        with engine.begin() as connection:
            connection.execute(text(SEED), {"rows": rows})
            connection.execute(text("ANALYZE task"))
            task_id = connection.execute(text("SELECT id FROM task LIMIT 1")).scalar_one()
        seeded = time.monotonic() - started
        engine.dispose()
        results: dict[str, Any] = {}
        with TestClient(create_app(settings)) as client:
            for page in (template.format(task_id=task_id) for template in PAGES):
                client.get(page)  # warm: the first request builds the engine and templates
                times = []
                for _ in range(repeat):
                    begun = time.perf_counter()
                    answer = client.get(page, follow_redirects=False)
                    times.append((time.perf_counter() - begun) * 1000)
                    assert answer.status_code == 200, (page, answer.status_code)
                results[page] = {
                    "median_ms": statistics.median(times),
                    "p90_ms": sorted(times)[int(len(times) * 0.9) - 1],
                }
                print(f"{page:60s} median {results[page]['median_ms']:7.1f} ms")
        return {"rows": rows, "seed_seconds": seeded, "pages": results, "bound_ms": BOUND_MS}


def rows_for(options: Options) -> int:
    return 100_000 if options.quick else 1_000_000


def estimate(options: Options) -> float:
    return 30 + rows_for(options) / 10_000


def run(options: Options) -> dict[str, Any]:
    return measure(rows_for(options), 5 if options.quick else 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument(
        "--save", action="store_true", help="write bench/results/<date>-console.json"
    )
    options = parser.parse_args()
    report = measure(options.rows, options.repeat)
    if options.save:
        stamp = now_stamp().strftime("%Y-%m-%d")
        write_json(ROOT / "bench" / "results" / f"{stamp}-console.json", report)


if __name__ == "__main__":
    main()
