"""The manifests against the application's code: routes, ports, settings, time limits, queues.

A renamed route, a new longer task type or a changed default breaks these tests, not a cluster.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Match

from app.api import health
from app.core.config import Settings
from tests.deploy.support import Object, by_kind, config_data, container, one, pod_spec, workloads


def application() -> Any:
    """The assembled app (`app.main`), with default settings."""
    from app.main import create_app

    return create_app(Settings.model_validate({}))


def served(path: str) -> bool:
    """The assembled app answers GET `path` with a route (no 404)."""
    scope = {"type": "http", "path": path, "method": "GET", "root_path": "", "headers": []}
    return any(route.matches(scope)[0] is Match.FULL for route in application().router.routes)


def public_paths() -> set[str]:
    return set(application().openapi()["paths"])


def path_of(endpoint: Any) -> str:
    """The documented path of a health endpoint, checked to be served by the assembled app."""
    (path,) = [
        route.path
        for route in health.router.routes
        if isinstance(route, APIRoute) and route.endpoint is endpoint and route.include_in_schema
    ]
    assert served(path), f"{path} is in app.api.health but not served by app.main"
    return path


def settings_from(config: dict[str, str]) -> Settings:
    """The Settings a pod reading this ConfigMap gets (validated as at start; nothing else is
    read: not this process's environment, nor a .env file)."""
    values = {
        key.removeprefix("TASKDOCK_").lower(): value
        for key, value in config.items()
        if key.removeprefix("TASKDOCK_").lower() in Settings.model_fields
    }
    return Settings.model_validate(values)


def test_every_configmap_is_valid_production_settings(rendered: dict[str, list[Object]]) -> None:
    for objects in rendered.values():
        config = config_data(objects)
        settings = settings_from(config)
        assert settings.environment.value == "production"
        assert settings.api_host == "0.0.0.0"
        assert settings.broker_name == "redis"
        assert not settings.embedded
        # Probes and scrapes send the pod's IP as Host: a host allow-list would answer them 400.
        assert settings.allowed_hosts == ["*"]
        # Every key is a setting, or the entrypoint's own TASKDOCK_WAIT_TIMEOUT.
        unknown = {
            key
            for key in config
            if key.removeprefix("TASKDOCK_").lower() not in Settings.model_fields
        }
        assert unknown == {"TASKDOCK_WAIT_TIMEOUT", "TASKDOCK_SECRETS_DIR"}


def test_api_probes_hit_the_real_health_routes(rendered: dict[str, list[Object]]) -> None:
    live, ready = path_of(health.live), path_of(health.ready)
    for objects in rendered.values():
        api = container(one(objects, "Deployment", "taskdock-api"), "api")
        port = {p["name"]: p["containerPort"] for p in api["ports"]}
        assert api["readinessProbe"]["httpGet"]["path"] == ready
        assert api["livenessProbe"]["httpGet"]["path"] == live
        assert api["startupProbe"]["httpGet"]["path"] == live
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert (
                port[api[probe]["httpGet"]["port"]] == settings_from(config_data(objects)).api_port
            )


def test_metrics_are_scraped_where_they_are_served(production: list[Object]) -> None:
    settings = settings_from(config_data(production))
    assert served("/metrics")
    expected = {
        "taskdock-api": settings.api_port,
        "taskdock-worker": settings.worker_metrics_port,
        "taskdock-dispatcher": settings.dispatcher_metrics_port,
    }
    for name, port in expected.items():
        deployment = one(production, "Deployment", name)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port
        ports = [
            p["containerPort"]
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        ]
        assert ports == [port]
    # The defaults the ConfigMap repeats are the application's.
    defaults = Settings.model_fields
    assert settings.api_port == defaults["api_port"].default
    assert settings.worker_metrics_port == defaults["worker_metrics_port"].default
    assert settings.dispatcher_metrics_port == defaults["dispatcher_metrics_port"].default


def test_ingress_publishes_real_routes_and_never_metrics(production: list[Object]) -> None:
    paths = public_paths()
    ingress = one(production, "Ingress", "taskdock")
    prefixes = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    for prefix in prefixes:
        # The console's pages are outside the OpenAPI schema (they are HTML): served is enough.
        documented = any(path == prefix or path.startswith(prefix + "/") for path in paths)
        assert documented or served(prefix), prefix
    assert not any(p == "/metrics" or "/metrics".startswith(p.rstrip("/") + "/") for p in prefixes)


@pytest.mark.parametrize("role", ["worker", "dispatcher"])
def test_heartbeat_probes_read_a_file_on_a_writable_mount(
    rendered: dict[str, list[Object]], role: str
) -> None:
    from app import healthcheck

    assert role in healthcheck.DEFAULTS
    for objects in rendered.values():
        settings = settings_from(config_data(objects))
        item = container(one(objects, "Deployment", f"taskdock-{role}"), role)
        for probe in ("livenessProbe", "startupProbe"):
            assert item[probe]["exec"]["command"] == ["python", "-m", "app.healthcheck", role]
        heartbeat: Path = getattr(settings, f"{role}_heartbeat_file")
        writable = [Path(m["mountPath"]) for m in item["volumeMounts"] if not m.get("readOnly")]
        for path in (heartbeat, settings.metrics_dir):
            assert any(path.is_relative_to(mount) for mount in writable), path
        # The probe must outlast a stale heartbeat's limit before it fails the pod.
        liveness = item["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > getattr(
            settings, f"{role}_heartbeat_max_age"
        )


def test_worker_grace_outlasts_the_longest_task(rendered: dict[str, list[Object]]) -> None:
    from app.tasks.registry import all_task_types, load_task_modules

    load_task_modules([])
    for objects in rendered.values():
        settings = settings_from(config_data(objects))
        longest = max(
            [
                settings.task_default_time_limit,
                *(t.time_limit for t in all_task_types() if t.time_limit),
            ]
        )
        spec = pod_spec(one(objects, "Deployment", "taskdock-worker"))
        assert spec is not None
        assert spec["terminationGracePeriodSeconds"] > longest + settings.task_hard_limit_grace


def test_api_grace_lets_requests_in_flight_finish(rendered: dict[str, list[Object]]) -> None:
    for objects in rendered.values():
        settings = settings_from(config_data(objects))
        spec = pod_spec(one(objects, "Deployment", "taskdock-api"))
        assert spec is not None
        (item,) = spec["containers"]
        command = item["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        assert (
            spec["terminationGracePeriodSeconds"] > int(command[1]) + settings.api_graceful_timeout
        )


def test_roles_run_the_cli_commands(production: list[Object]) -> None:
    from app.cli import cli

    commands = {
        c.name or (c.callback.__name__ if c.callback else "") for c in cli.registered_commands
    }
    for obj, spec in workloads(production):
        (item,) = spec["containers"]
        assert item["args"][0] == "taskdock"
        assert item["args"][1] in commands, obj["metadata"]["name"]
    job = one(production, "Job", "taskdock-migrate")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["taskdock", "migrate"]


def test_secrets_are_the_files_the_settings_read(production: list[Object]) -> None:
    import yaml

    from tests.deploy.support import K8S

    secret_fields = {
        f"taskdock_{name}"
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    template = yaml.safe_load((K8S / "secret.template.yaml").read_text())
    assert set(template["stringData"]) == secret_fields
    assert settings_from(config_data(production)).model_dump()["database_password"] is None
    assert config_data(production)["TASKDOCK_SECRETS_DIR"] == "/run/secrets"
    for obj, spec in workloads(production):
        volumes = {v["name"]: v for v in spec["volumes"]}
        (mount,) = [
            m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/run/secrets"
        ]
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == template["metadata"]["name"]
        keys = {item["key"] for item in secret.get("items", [])} or secret_fields
        assert keys <= secret_fields
        # Only the migration registers the bootstrap key; only it sees it.
        has_bootstrap = "taskdock_bootstrap_api_key" in keys
        assert has_bootstrap == (obj["kind"] == "Job"), obj["metadata"]["name"]


def redis_lists(queue: str) -> set[str]:
    """The Redis lists Celery's transport keeps a queue's messages in, for every task priority
    taskdock publishes (app/tasks/publisher.py: Redis priority 9 - p)."""
    from kombu.transport.redis import Channel

    # The transport's own methods, called on a stand-in: no connection is needed for names.
    transport: Any = Channel
    channel = SimpleNamespace(priority_steps=transport.priority_steps, sep=transport.sep)
    channel.priority = lambda n: transport.priority(channel, n)
    return {transport._q_for_pri(channel, queue, 9 - p) for p in range(10)}


def test_keda_reads_every_list_of_the_default_queue(rendered_keda: list[Object]) -> None:
    from app.core.celery import create_celery_app

    settings = settings_from(config_data(rendered_keda))
    queue = create_celery_app(Settings.model_validate({})).conf.task_default_queue
    scaled = one(rendered_keda, "ScaledObject", "taskdock-worker")
    spec = scaled["spec"]
    assert scaled["metadata"]["namespace"] == "taskdock-production"
    assert spec["scaleTargetRef"]["name"] in by_kind(rendered_keda, "Deployment")
    assert spec["scaleTargetRef"]["name"] == "taskdock-worker"
    triggers = spec["triggers"]
    assert {t["metadata"]["listName"] for t in triggers} == redis_lists(queue)
    assert spec["advanced"]["scalingModifiers"]["formula"] == " + ".join(
        t["name"] for t in triggers
    )
    broker = urlsplit(settings.broker_url)
    auth = one(rendered_keda, "TriggerAuthentication", "taskdock-broker")
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref == {
        "parameter": "password",
        "name": "taskdock-secrets",
        "key": "taskdock_broker_password",
    }
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["authenticationRef"]["name"] == "taskdock-broker"
        assert trigger["metadata"]["address"].rsplit(":", 1)[1] == str(broker.port)
        assert trigger["metadata"]["databaseIndex"] == broker.path.strip("/")
    # KEDA owns the worker count: no other autoscaler may target the workers.
    for hpa in by_kind(rendered_keda, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] != "taskdock-worker"
