"""Every pod meets the "restricted" Pod Security Standard, and the check itself can fail."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest

from tests.deploy.podsecurity import Spec, all_containers, violations
from tests.deploy.support import Object, by_kind, workloads

ROLES = ("taskdock-api", "taskdock-worker", "taskdock-dispatcher", "taskdock-migrate")


def test_every_pod_passes(rendered: dict[str, list[Object]], rendered_keda: list[Object]) -> None:
    renders = {**rendered, "production+keda": rendered_keda}
    checked = []
    for overlay, objects in renders.items():
        for obj, spec in workloads(objects):
            name = f"{overlay}/{obj['kind']}/{obj['metadata']['name']}"
            assert violations(spec) == [], name
            checked.append(obj["metadata"]["name"])
    assert sorted(set(checked)) == sorted(ROLES)


def test_namespace_enforces_restricted(rendered: dict[str, list[Object]]) -> None:
    for objects in rendered.values():
        (namespace,) = by_kind(objects, "Namespace").values()
        labels = namespace["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


# Each mutation takes away one thing the pods need (or sets it wrong); the check must notice.


def _pod_and_containers(spec: Spec) -> list[Spec]:
    return [spec.setdefault("securityContext", {})] + [
        c.setdefault("securityContext", {}) for c in all_containers(spec)
    ]


def drop_everywhere(key: str) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        for context in _pod_and_containers(spec):
            context.pop(key, None)

    return mutate


def set_in_container(key: str, value: object) -> Callable[[Spec], None]:
    def mutate(spec: Spec) -> None:
        spec["containers"][0].setdefault("securityContext", {})[key] = value

    return mutate


def drop_capability_drop(spec: Spec) -> None:
    spec["containers"][0]["securityContext"]["capabilities"].pop("drop")


def add_capability(spec: Spec) -> None:
    spec["containers"][0]["securityContext"]["capabilities"]["add"] = ["SYS_ADMIN"]


def unconfined_seccomp(spec: Spec) -> None:
    spec["containers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}


def drop_tmp_mount(spec: Spec) -> None:
    mounts = spec["containers"][0]["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != "/tmp"]


def tmp_on_host(spec: Spec) -> None:
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/tmp"]
    for volume in spec["volumes"]:
        if volume["name"] == mount["name"]:
            volume.pop("emptyDir")
            volume["hostPath"] = {"path": "/tmp"}


def mount_token(spec: Spec) -> None:
    spec.pop("automountServiceAccountToken")


def host_network(spec: Spec) -> None:
    spec["hostNetwork"] = True


def host_port(spec: Spec) -> None:
    spec["containers"][0]["ports"] = [{"containerPort": 8000, "hostPort": 8000}]


MUTATIONS: dict[str, Callable[[Spec], None]] = {
    "no runAsNonRoot": drop_everywhere("runAsNonRoot"),
    "no runAsUser": drop_everywhere("runAsUser"),
    "no runAsGroup": drop_everywhere("runAsGroup"),
    "no seccompProfile": drop_everywhere("seccompProfile"),
    "no allowPrivilegeEscalation": drop_everywhere("allowPrivilegeEscalation"),
    "no readOnlyRootFilesystem": drop_everywhere("readOnlyRootFilesystem"),
    "no capabilities drop": drop_capability_drop,
    "no /tmp mount": drop_tmp_mount,
    "no automountServiceAccountToken false": mount_token,
    "runAsNonRoot false": set_in_container("runAsNonRoot", False),
    "uid 0": set_in_container("runAsUser", 0),
    "privilege escalation": set_in_container("allowPrivilegeEscalation", True),
    "privileged": set_in_container("privileged", True),
    "writable root": set_in_container("readOnlyRootFilesystem", False),
    "capability added": add_capability,
    "seccomp unconfined": unconfined_seccomp,
    "/tmp on a hostPath": tmp_on_host,
    "host network": host_network,
    "host port": host_port,
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_check_fails_a_pod_missing_a_setting(
    production: list[Object], role: str, mutation: str
) -> None:
    (spec,) = [s for obj, s in workloads(production) if obj["metadata"]["name"] == role]
    assert violations(spec) == []
    broken = copy.deepcopy(spec)
    MUTATIONS[mutation](broken)

    assert violations(broken) != [], f"{role} without '{mutation}' still passes"
    assert violations(spec) == [], "the check changed the original"
