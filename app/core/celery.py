"""The Celery application: a doorbell that carries only (task id, attempt)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from app.core.config import Settings, get_settings

JOB_NAME = "taskdock.execute"
FILESYSTEM_TRANSPORT = "app.core.fsbroker:Transport"


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options; the visibility timeout outlives every task's time limit."""
    scheme = settings.celery_broker_url.split("://", 1)[0]
    if scheme == "filesystem":
        for sub in ("queue", "control", "processed"):
            (settings.broker_dir / sub).mkdir(parents=True, exist_ok=True)
        folder = str(settings.broker_dir / "queue")
        return {
            "data_folder_in": folder,
            "data_folder_out": folder,
            "control_folder": str(settings.broker_dir / "control"),
            "processed_folder": str(settings.broker_dir / "processed"),
            "store_processed": False,
            "polling_interval": 0.1,
        }
    options: dict[str, Any] = {}
    if scheme.startswith("redis"):
        # A lost ack must not loop a task: redelivery only after the longest run could end.
        options["visibility_timeout"] = int(
            max_time_limit(settings) + settings.task_hard_limit_grace + 60
        )
        options["socket_connect_timeout"] = settings.publish_timeout
        options["socket_timeout"] = 5
        options["socket_keepalive"] = True
        options["retry_on_timeout"] = False
        options["health_check_interval"] = 10
    options["max_retries"] = 0
    return options


def max_time_limit(settings: Settings) -> float:
    from app.tasks.registry import all_task_types

    limits = [task.time_limit for task in all_task_types() if task.time_limit]
    return max([settings.task_default_time_limit, *limits])


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("taskdock", broker=settings.celery_broker_url, include=["app.tasks.jobs"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        # No Celery monitoring events: the record in the database is the truth and the metrics
        # come from it. Events cost the broker four extra messages per task that nobody reads;
        # run a worker with `-E` for Flower.
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_default_queue="default",
        task_create_missing_queues=True,
        task_queue_max_priority=10,
        task_default_priority=5,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.publish_timeout,
        broker_transport_options=broker_options(settings),
        broker_pool_limit=10,
        broker_transport=FILESYSTEM_TRANSPORT if settings.broker_name == "broker" else None,
        timezone="UTC",
        enable_utc=True,
    )
    return app


@lru_cache
def get_celery_app() -> Celery:
    return create_celery_app(get_settings())
