"""The Kubernetes "restricted" Pod Security Standard, plus taskdock's own hardening, as a check.

`restricted_violations(spec)` follows the standard's controls (baseline and restricted, version
"latest"): what the admission controller of a namespace labelled
`pod-security.kubernetes.io/enforce: restricted` refuses. `hardening_violations(spec)` adds what
taskdock requires on top: uid/gid 1001, a read-only root filesystem with an emptyDir at /tmp, and
no service account token.
"""

from __future__ import annotations

from typing import Any

UID = GID = 1001
ALLOWED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}

Spec = dict[str, Any]


def all_containers(spec: Spec) -> list[Spec]:
    kinds = ("initContainers", "containers", "ephemeralContainers")
    return [c for kind in kinds for c in spec.get(kind) or []]


def _effective(spec: Spec, container: Spec, key: str) -> Any:
    """A security setting as it applies to a container: its own, else the pod's."""
    own = (container.get("securityContext") or {}).get(key)
    return own if own is not None else (spec.get("securityContext") or {}).get(key)


def restricted_violations(spec: Spec) -> list[str]:
    """Why this pod spec fails the "restricted" profile; empty when it passes."""
    problems: list[str] = []
    pod_sc = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is on")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {volume['name']} is of a forbidden type {sorted(kinds)}")
    for sysctl in pod_sc.get("sysctls") or []:
        if sysctl["name"] not in SAFE_SYSCTLS:
            problems.append(f"sysctl {sysctl['name']} is not in the safe set")
    if pod_sc.get("runAsUser") == 0:
        problems.append("the pod runs as uid 0")

    for container in all_containers(spec):
        name = container["name"]
        sc = container.get("securityContext") or {}
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            problems.append(f"{name}: adds capabilities {sorted(added)}")
        if _effective(spec, container, "runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            problems.append(f"{name}: runs as uid 0")
        seccomp = (_effective(spec, container, "seccompProfile") or {}).get("type")
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            problems.append(f"{name}: seccompProfile is {seccomp or 'unset'}")
        if sc.get("procMount") not in {None, "Default"}:
            problems.append(f"{name}: procMount {sc['procMount']}")
        selinux = _effective(spec, container, "seLinuxOptions") or {}
        if (
            selinux.get("type", "") not in SELINUX_TYPES
            or selinux.get("user")
            or selinux.get("role")
        ):
            problems.append(f"{name}: SELinux options {selinux}")
        apparmor = (_effective(spec, container, "appArmorProfile") or {}).get("type")
        if apparmor == "Unconfined":
            problems.append(f"{name}: AppArmor unconfined")
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                problems.append(f"{name}: hostPort {port['hostPort']}")
    return problems


def hardening_violations(spec: Spec) -> list[str]:
    """What taskdock requires beyond the profile; empty when the pod spec has all of it."""
    problems: list[str] = []
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("the service account token is mounted")
    volumes = {volume["name"]: volume for volume in spec.get("volumes") or []}
    for container in all_containers(spec):
        name = container["name"]
        if _effective(spec, container, "runAsUser") != UID:
            problems.append(f"{name}: runAsUser is not {UID}")
        if _effective(spec, container, "runAsGroup") != GID:
            problems.append(f"{name}: runAsGroup is not {GID}")
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
        tmp = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
        if not tmp:
            problems.append(f"{name}: nothing is mounted at /tmp")
        elif "emptyDir" not in volumes.get(tmp[0]["name"], {}):
            problems.append(f"{name}: /tmp is not an emptyDir")
        elif tmp[0].get("readOnly"):
            problems.append(f"{name}: /tmp is read-only")
    return problems


def violations(spec: Spec) -> list[str]:
    return restricted_violations(spec) + hardening_violations(spec)
