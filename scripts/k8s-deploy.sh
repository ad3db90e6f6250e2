#!/usr/bin/env bash
# Deploy an overlay of deploy/k8s to the cluster of the current kubectl context, in order:
#   1. the shared objects (namespace, service account, config, network policies);
#   2. the migration Job (the previous run deleted first), waited for;
#   3. everything else (Deployments, Services, Ingress, autoscalers, budgets), then the rollouts.
# A roll back is the same command with the previous image (docs/deploy/ci-cd.md).
#
# Usage: scripts/k8s-deploy.sh OVERLAY_DIR IMAGE
#   e.g. scripts/k8s-deploy.sh deploy/k8s/overlays/staging registry.example.com/taskdock:3f2a9c1
#
# Environment: KUBECTL (default: kubectl on PATH), MIGRATE_TIMEOUT (seconds, default 900),
# ROLLOUT_TIMEOUT (default 10m). The Secret taskdock-secrets must exist in the namespace.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
[[ $# -eq 2 ]] || {
  echo "usage: scripts/k8s-deploy.sh OVERLAY_DIR IMAGE" >&2
  exit 2
}
overlay=$1
image=$2
kubectl=${KUBECTL:-kubectl}
migrate_timeout=${MIGRATE_TIMEOUT:-900}
rollout_timeout=${ROLLOUT_TIMEOUT:-10m}

# Every object carries app.kubernetes.io/component except the shared ones; the Job's is migrate.
COMPONENT=app.kubernetes.io/component
SHARED="!$COMPONENT"
MIGRATE="$COMPONENT=migrate"
REST="$COMPONENT,$COMPONENT!=migrate"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
manifests=$work/manifests.yaml
"$root/scripts/k8s-render.sh" "$overlay" --image "$image" >"$manifests"

namespace=$(awk '/^kind: Namespace$/ { ns = 1 } ns && /^  name: / { print $2; exit } /^---$/ { ns = 0 }' \
  "$manifests")
[[ -n $namespace ]] || {
  echo "k8s-deploy: $overlay renders no Namespace" >&2
  exit 1
}
echo "k8s-deploy: $image to namespace $namespace"

"$kubectl" apply -f "$manifests" -l "$SHARED"

if ! "$kubectl" -n "$namespace" get secret taskdock-secrets -o name >/dev/null; then
  echo "k8s-deploy: create the Secret taskdock-secrets in $namespace first" \
    "(docs/deploy/kubernetes.md)" >&2
  exit 1
fi

# A Job's pod template is immutable: a new image means a new Job.
"$kubectl" -n "$namespace" delete job taskdock-migrate --ignore-not-found --wait=true
"$kubectl" apply -f "$manifests" -l "$MIGRATE"
deadline=$((SECONDS + migrate_timeout))
while :; do
  state=$("$kubectl" -n "$namespace" get job taskdock-migrate \
    -o 'jsonpath={range .status.conditions[?(@.status=="True")]}{.type}{" "}{end}')
  case " $state " in
    *" Complete "*)
      echo "k8s-deploy: migrations done"
      break
      ;;
    *" Failed "*)
      "$kubectl" -n "$namespace" logs job/taskdock-migrate --tail=50 >&2 || true
      echo "k8s-deploy: the migration Job failed; nothing else was changed" >&2
      exit 1
      ;;
  esac
  if ((SECONDS >= deadline)); then
    echo "k8s-deploy: the migration Job did not finish in ${migrate_timeout}s" >&2
    exit 1
  fi
  sleep 5
done

"$kubectl" apply -f "$manifests" -l "$REST"

for role in api dispatcher; do
  "$kubectl" -n "$namespace" rollout status "deployment/taskdock-$role" --timeout="$rollout_timeout"
done
# Old workers finish their running tasks first (up to terminationGracePeriodSeconds): once every
# new worker is available, a rollout still waiting on old ones is not a failure.
if ! "$kubectl" -n "$namespace" rollout status deployment/taskdock-worker \
  --timeout="$rollout_timeout"; then
  status=$("$kubectl" -n "$namespace" get deployment taskdock-worker \
    -o 'jsonpath={.spec.replicas} {.status.updatedReplicas} {.status.availableReplicas}')
  read -r wanted updated available <<<"$status"
  if [[ ${updated:-0} -ge $wanted && ${available:-0} -ge $wanted ]]; then
    echo "k8s-deploy: new workers are up; old ones are still finishing their tasks"
  else
    echo "k8s-deploy: the worker rollout did not finish ($status: wanted updated available)" >&2
    exit 1
  fi
fi
echo "k8s-deploy: $image is live in $namespace"
