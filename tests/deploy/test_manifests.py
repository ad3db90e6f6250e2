"""The rendered overlays: valid Kubernetes objects, wired to each other, two real environments."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    K8S,
    Object,
    by_kind,
    config_data,
    container,
    matches,
    missing,
    one,
    pod_spec,
    workloads,
)

# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships; the manifests use
# nothing older than 1.25 (policy/v1, autoscaling/v2, Pod Security admission).
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
# Custom resources: KEDA's, checked by test_keda.
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication"}
DEPLOYMENTS = ("taskdock-api", "taskdock-worker", "taskdock-dispatcher")


def validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError:
        missing("kubernetes-validate is not installed (a dev dependency)")
    return kubernetes_validate


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_matches_the_kubernetes_schema(
    rendered: dict[str, list[Object]], rendered_keda: list[Object], version: str
) -> None:
    module = validator()
    renders = {**rendered, "production+keda": rendered_keda}
    for overlay, objects in renders.items():
        for obj in objects:
            if obj["kind"] in CUSTOM_KINDS:
                continue
            where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
            try:
                module.validate(obj, version, strict=True)
            except module.ValidationError as exc:
                pytest.fail(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_schema_check_catches_a_misspelt_field(production: list[Object]) -> None:
    module = validator()
    api = copy.deepcopy(one(production, "Deployment", "taskdock-api"))
    api["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {}}

    with pytest.raises(module.ValidationError):
        module.validate(api, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_secret_template_is_valid_and_empty() -> None:
    module = validator()
    template = yaml.safe_load((K8S / "secret.template.yaml").read_text())
    module.validate(template, KUBERNETES_VERSIONS[-1], strict=True)
    assert set(template["stringData"].values()) == {""}


@pytest.mark.parametrize("overlay", ["staging", "production"])
def test_each_overlay_holds_the_whole_stack(
    rendered: dict[str, list[Object]], overlay: str
) -> None:
    kinds: dict[str, set[str]] = {}
    for obj in rendered[overlay]:
        kinds.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])

    assert set(kinds["Deployment"]) == set(DEPLOYMENTS)
    assert kinds["Job"] == {"taskdock-migrate"}
    assert kinds["Service"] == {
        "taskdock-api",
        "taskdock-worker-metrics",
        "taskdock-dispatcher-metrics",
    }
    assert kinds["HorizontalPodAutoscaler"] == {"taskdock-api"}
    assert kinds["PodDisruptionBudget"] == {"taskdock-api", "taskdock-worker"}
    assert kinds["Ingress"] == {"taskdock"}
    assert kinds["ServiceAccount"] == {"taskdock"}
    assert "taskdock-default-deny" in kinds["NetworkPolicy"]
    # Never a Secret: applying an overlay must not overwrite the one created by hand.
    assert "Secret" not in kinds
    namespace = f"taskdock-{overlay}"
    assert kinds["Namespace"] == {namespace}
    for obj in rendered[overlay]:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]["name"]


def test_pods_use_the_service_account_without_a_token(production: list[Object]) -> None:
    account = one(production, "ServiceAccount", "taskdock")
    assert account["automountServiceAccountToken"] is False
    for _obj, spec in workloads(production):
        assert spec["serviceAccountName"] == "taskdock"
        assert spec["automountServiceAccountToken"] is False
        # Service links would set TASKDOCK_API_PORT=tcp://… (from the Service taskdock-api) in
        # the environment the settings are read from.
        assert spec["enableServiceLinks"] is False


def test_selectors_pick_their_own_pods(production: list[Object]) -> None:
    deployments = by_kind(production, "Deployment")
    for deployment in deployments.values():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        others = [d for d in deployments.values() if d is not deployment]
        for other in others:
            other_labels = other["spec"]["template"]["metadata"]["labels"]
            assert not selector.items() <= other_labels.items()
    for kind in ("Service", "PodDisruptionBudget"):
        for obj in by_kind(production, kind).values():
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            chosen = [
                d["metadata"]["name"]
                for d in deployments.values()
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(chosen) == 1, f"{kind} {obj['metadata']['name']} selects {chosen}"


def test_services_and_ingress_reach_named_ports(production: list[Object]) -> None:
    deployments = by_kind(production, "Deployment")
    for service in by_kind(production, "Service").values():
        (target,) = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    ingress = one(production, "Ingress", "taskdock")
    services = by_kind(production, "Service")
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            port_names = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
            assert backend["port"]["name"] in port_names


def test_ingress_tls_covers_its_host(rendered: dict[str, list[Object]]) -> None:
    hosts = {}
    for overlay, objects in rendered.items():
        ingress = one(objects, "Ingress", "taskdock")
        (rule,) = ingress["spec"]["rules"]
        (tls,) = ingress["spec"]["tls"]
        assert tls["hosts"] == [rule["host"]]
        assert tls["secretName"]
        hosts[overlay] = rule["host"]
    assert hosts["staging"] != hosts["production"]


def test_the_autoscaler_floor_is_the_deployment_count(rendered: dict[str, list[Object]]) -> None:
    for objects in rendered.values():
        hpa = one(objects, "HorizontalPodAutoscaler", "taskdock-api")
        api = one(objects, "Deployment", "taskdock-api")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "taskdock-api"
        assert hpa["spec"]["minReplicas"] == api["spec"]["replicas"] < hpa["spec"]["maxReplicas"]
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"


def test_rollouts_never_drop_below_the_wanted_count(production: list[Object]) -> None:
    for name in DEPLOYMENTS:
        strategy = one(production, "Deployment", name)["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pods_have_requests_and_limits(rendered: dict[str, list[Object]]) -> None:
    for objects in rendered.values():
        for obj, spec in workloads(objects):
            for item in spec["containers"]:
                resources = item["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(resources[kind]), obj["metadata"]["name"]


def test_api_spreads_over_nodes(production: list[Object]) -> None:
    spec = pod_spec(one(production, "Deployment", "taskdock-api"))
    assert spec is not None
    by_key = {c["topologyKey"]: c for c in spec["topologySpreadConstraints"]}
    node = by_key["kubernetes.io/hostname"]
    assert node["whenUnsatisfiable"] == "DoNotSchedule"
    assert (
        node["labelSelector"]["matchLabels"].items()
        <= (
            one(production, "Deployment", "taskdock-api")["spec"]["template"]["metadata"]["labels"]
        ).items()
    )


def test_staging_and_production_differ(staging: list[Object], production: list[Object]) -> None:
    """Replicas, resources, config and image tag: the issue's four differences."""
    assert one(production, "Deployment", "taskdock-api")["spec"]["replicas"] == 3
    for name in DEPLOYMENTS:
        small = one(staging, "Deployment", name)
        large = one(production, "Deployment", name)
        assert small["spec"]["replicas"] <= large["spec"]["replicas"]
        role = name.removeprefix("taskdock-")
        assert container(small, role)["resources"] != container(large, role)["resources"]
    assert sum(one(staging, "Deployment", n)["spec"]["replicas"] for n in DEPLOYMENTS) < sum(
        one(production, "Deployment", n)["spec"]["replicas"] for n in DEPLOYMENTS
    )
    assert config_data(staging) != config_data(production)
    images = {
        name: {c["image"] for _obj, spec in workloads(objects) for c in spec["containers"]}
        for name, objects in (("staging", staging), ("production", production))
    }
    (staging_image,) = images["staging"]
    (production_image,) = images["production"]
    assert staging_image.rsplit(":", 1)[0] == production_image.rsplit(":", 1)[0]
    assert staging_image.rsplit(":", 1)[1] != production_image.rsplit(":", 1)[1]
    assert production_image.rsplit(":", 1)[1] not in {"latest", "main"}


def test_network_policies(production: list[Object]) -> None:
    policies = by_kind(production, "NetworkPolicy")
    deny = policies["taskdock-default-deny"]["spec"]
    assert deny["podSelector"] == {}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}

    pods = {
        obj["metadata"]["name"]: obj["spec"]["template"]["metadata"]["labels"]
        for obj, _ in workloads(production)
    }

    def selected(policy: Object) -> set[str]:
        selector = policy["spec"]["podSelector"]
        found = set()
        for name, labels in pods.items():
            ok = selector.get("matchLabels", {}).items() <= labels.items()
            for expression in selector.get("matchExpressions", []):
                assert expression["operator"] == "In"
                ok = ok and labels.get(expression["key"]) in expression["values"]
            if ok:
                found.add(name)
        return found

    # Only the API is reachable from the ingress controller's namespace.
    from_ingress = [
        p
        for p in policies.values()
        if any(
            "ingress-nginx" in str(source.get("namespaceSelector"))
            for rule in p["spec"].get("ingress", [])
            for source in rule.get("from", [])
        )
    ]
    assert [selected(p) for p in from_ingress] == [{"taskdock-api"}]
    (ingress_rule,) = from_ingress[0]["spec"]["ingress"]
    assert [p["port"] for p in ingress_rule["ports"]] == [8000]
    # Prometheus scrapes the API, the workers and the dispatchers on their metrics ports only.
    scrape = policies["taskdock-prometheus-scrape"]
    assert selected(scrape) == {"taskdock-api", "taskdock-worker", "taskdock-dispatcher"}
    (rule,) = scrape["spec"]["ingress"]
    assert sorted(p["port"] for p in rule["ports"]) == [8000, 9808, 9809]
    # Every taskdock pod may reach DNS and the datastores' ports, and nothing else.
    egress = policies["taskdock-egress"]
    assert selected(egress) == set(pods)
    ports = {p["port"] for rule in egress["spec"]["egress"] for p in rule["ports"]}
    assert ports == {53, 5432, 6379, 5672, 5671}
    # Datastores in the namespace accept only taskdock's pods.
    datastores = policies["taskdock-datastores"]["spec"]
    (source,) = datastores["ingress"][0]["from"]
    assert source == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "taskdock"}}}
    for labels in pods.values():
        assert labels["app.kubernetes.io/part-of"] == "taskdock"


def test_deploy_script_selectors_split_every_object_once(
    rendered: dict[str, list[Object]], rendered_keda: list[Object]
) -> None:
    from tests.deploy.test_deploy_script import SELECTORS

    for objects in [*rendered.values(), rendered_keda]:
        for obj in objects:
            labels = obj["metadata"].get("labels", {})
            steps = [step for step, selector in SELECTORS.items() if matches(selector, labels)]
            assert len(steps) == 1, f"{obj['kind']}/{obj['metadata']['name']} in {steps}"
            if obj["kind"] == "Job":
                assert steps == ["migrate"]
            if obj["kind"] in {"Namespace", "ServiceAccount", "ConfigMap", "NetworkPolicy"}:
                assert steps == ["shared"]
            if obj["kind"] in {"Deployment", "ScaledObject"}:
                assert steps == ["rest"]
