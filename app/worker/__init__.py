"""The worker side: what runs inside `taskdock worker` (`celery -A app.worker worker`).

Read in this order:

- `celery.py`: the process's start. It labels the process, loads the task modules and builds
  the Celery app (`app.worker.celery:celery_app`; Celery finds it from `-A app.worker` by
  itself).
- `jobs.py`: the one Celery job, `taskdock.execute(task_id, attempt)`. It maps a run's outcome
  to Celery's states, so Flower reads right, and acknowledges every message once the outcome is
  written.
- `runner.py`: one delivery of one attempt: claim the record (fenced by attempt), keep its lease
  while the task runs, write the outcome. The writes themselves are `app.tasks.lifecycle`'s.
- `hooks.py`: the process's wiring: JSON logs, the consumer heartbeat the health check reads,
  and the sweep of cancelled runs.

Shared with the API, so kept in `app/core/`: the Celery app's configuration (`core/celery.py`,
which the API publishes through), the broker transports (`core/fsbroker.py`,
`core/redisbroker.py`) and the metrics directory of prefork children (`core/multiproc.py`).
The registry of live workers, read by the API and `taskdock status`, is the `app/workers/` domain.
Publication is `app.tasks.publication`; recovery is `app.tasks.lifecycle`.

This package's `__init__` starts nothing: importing `app.worker.runner` in a test or the API
does not boot a worker.
"""
