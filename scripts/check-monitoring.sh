#!/usr/bin/env bash
# Validate deploy/monitoring with promtool: the Prometheus config, the alert rules and their unit
# tests. Installs promtool (Debian's `prometheus` package) when it is missing.
#
# Usage: scripts/check-monitoring.sh
set -euo pipefail
cd "$(dirname "$0")/.."

MONITORING=deploy/monitoring
RULES=$MONITORING/rules

install_promtool() {
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "promtool is missing: install Debian's prometheus package (apt-get install prometheus)" >&2
    return 1
  fi
  echo "promtool is missing: installing Debian's prometheus package"
  export DEBIAN_FRONTEND=noninteractive
  local candidate
  candidate=$(apt-cache policy prometheus 2>/dev/null | awk '/Candidate:/ {print $2}')
  if [[ -z $candidate || $candidate == "(none)" ]]; then
    apt-get update -qq
  fi
  # The package starts a Prometheus server on install where it can. Only promtool is wanted: a
  # policy-rc.d that forbids starting services, unless the machine already has one.
  local policy=/usr/sbin/policy-rc.d added_policy=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    added_policy=1
  fi
  local before after pid status=0
  before=$(pgrep -x prometheus || true)
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null || status=$?
  if [[ -n $added_policy ]]; then
    rm -f "$policy"
  fi
  # A server the install started anyway (by systemd, which ignores policy-rc.d) is stopped by PID.
  after=$(pgrep -x prometheus || true)
  for pid in $after; do
    grep -qx "$pid" <<<"$before" || kill "$pid"
  done
  return "$status"
}

if ! command -v promtool >/dev/null; then
  started=$(date +%s)
  install_promtool
  echo "promtool installed in $(( $(date +%s) - started ))s"
fi
promtool --version 2>&1 | head -n1

# `promtool check config` also loads the rule files the config names, resolved against the
# config's own directory. The config names them where the Prometheus container mounts them
# (/etc/prometheus/rules/), which does not exist here: check a temporary copy that names this
# repository's rules instead. The rules are checked on their own as well.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#/etc/prometheus/rules/#$PWD/$RULES/#" "$MONITORING/prometheus.yml" >"$tmp/prometheus.yml"
if ! grep -q "$PWD/$RULES/" "$tmp/prometheus.yml"; then
  echo "$MONITORING/prometheus.yml names no rule file under /etc/prometheus/rules/" >&2
  exit 1
fi

promtool check config --lint=all --lint-fatal "$tmp/prometheus.yml"
promtool check rules --lint=all --lint-fatal "$RULES/taskdock.yml"
promtool test rules "$RULES/taskdock.test.yml"
