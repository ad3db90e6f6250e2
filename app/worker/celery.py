"""The worker process's start: `app.worker.celery:celery_app` (`celery -A app.worker worker`)."""

from __future__ import annotations

from app.core.config import get_settings
from app.core.multiproc import prepare_multiprocess_dir

# The worker's one read of its settings (a wrong value stops it here, in one line); the rest
# is handed them: the engine by `configure`, the jobs by the Celery app they run in
# (app.core.celery.app_settings), the hooks as an argument.
settings = get_settings()
# First, before prometheus_client is imported: the prefork pool's children share this directory.
prepare_multiprocess_dir(settings.metrics_dir, "worker")

from app.core.db import configure  # noqa: E402
from app.tasks.registry import load_task_modules  # noqa: E402
from app.worker.hooks import install_worker_hooks  # noqa: E402

configure(settings, role="worker")
load_task_modules(settings.task_modules)

from app.core.celery import create_celery_app  # noqa: E402 - the registry sets the time limits

celery_app = create_celery_app(settings)
install_worker_hooks(celery_app, settings)

__all__ = ["celery_app"]
