"""The Celery application: a doorbell that carries only (task id, attempt)."""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from celery import Celery
from celery.app.amqp import AMQP
from kombu import Exchange, Queue

from app.core.config import Settings

JOB_NAME = "taskdock.execute"
FILESYSTEM_TRANSPORT = "app.core.fsbroker:Transport"
REDIS_TRANSPORT = "app.core.redisbroker:Transport"


def transport(settings: Settings) -> str | None:
    """kombu's transport class, or ours where we fix one (app.core.fsbroker, .redisbroker).

    Not for rediss://: naming a transport class turns off kombu's TLS for that scheme.
    """
    scheme = settings.celery_broker_url.split("://", 1)[0]
    return {"filesystem": FILESYSTEM_TRANSPORT, "redis": REDIS_TRANSPORT}.get(scheme)


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


def consumed_queues(settings: Settings) -> list[Queue]:
    """Every queue of the registered task types and TASKDOCK_EXTRA_QUEUES.

    A worker started without -Q (`taskdock worker`, plain `celery -A app.worker worker`)
    consumes all of them. Each is declared as Celery declares a queue it creates on demand,
    so a publisher's and a worker's declarations always agree.
    """
    from app.tasks.registry import known_queues

    return [
        Queue(name, Exchange(name), routing_key=name)
        for name in sorted(known_queues(settings.extra_queues))
    ]


class DoorbellAMQP(AMQP):
    """Celery's messages, with the task-sent event named as every later event of the task.

    Celery names task-sent after the job (`taskdock.execute`), and task-received and the rest
    after the message's shadow, the task type's name: Flower would list a task under both.
    """

    def as_task_v2(self, *args: Any, **kwargs: Any) -> Any:
        message = super().as_task_v2(*args, **kwargs)
        shadow = message.headers.get("shadow")
        if shadow and message.sent_event is not None:
            message.sent_event["name"] = shadow
        return message


def create_celery_app(settings: Settings) -> Celery:
    """Call after the task modules are loaded: their queues are the ones consumed."""
    app = Celery(
        "taskdock",
        broker=settings.celery_broker_url,
        include=["app.worker.jobs"],
        amqp=DoorbellAMQP,
    )
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
        # Celery's monitoring events (Flower, `celery events`) only when asked: the record in the
        # database is the truth and the metrics come from it, and events cost the broker four
        # extra messages per task.
        worker_send_task_events=settings.worker_events,
        task_send_sent_event=settings.worker_events,
        task_default_queue="default",
        task_queues=consumed_queues(settings),
        task_create_missing_queues=True,
        task_queue_max_priority=10,
        task_default_priority=5,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.publish_timeout,
        broker_transport_options=broker_options(settings),
        broker_pool_limit=10,
        broker_transport=transport(settings),
        timezone="UTC",
        enable_utc=True,
    )
    # For its jobs (`app_settings`): Celery makes a job's instance itself, and the app it runs
    # in is the one thing it hands every job. Kept beside the app, not in its conf, which
    # `celery inspect conf` and `celery report` show to anyone on the broker.
    _SETTINGS[app] = settings
    return app


_SETTINGS: WeakKeyDictionary[Celery, Settings] = WeakKeyDictionary()


def app_settings(app: Celery) -> Settings:
    """The Settings `app` was built from: what its jobs (app.worker.jobs) run with."""
    return _SETTINGS[app]
