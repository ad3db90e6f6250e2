"""The Celery application for workers: `app.worker:celery_app` (`celery -A app.worker worker`)."""

from __future__ import annotations

from app.core.config import get_settings
from app.core.multiproc import prepare_multiprocess_dir

# First, before prometheus_client is imported: the prefork pool's children share this directory.
prepare_multiprocess_dir(get_settings().metrics_dir, "worker")

from app.core.db import set_process_role  # noqa: E402
from app.core.worker_hooks import install_worker_hooks  # noqa: E402
from app.tasks.registry import load_task_modules  # noqa: E402

set_process_role("worker")
load_task_modules(get_settings().task_modules)

from app.core.celery import get_celery_app  # noqa: E402 - the registry sets the time limits

celery_app = get_celery_app()
install_worker_hooks(celery_app, get_settings())

__all__ = ["celery_app"]
