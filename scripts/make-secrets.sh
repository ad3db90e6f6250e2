#!/usr/bin/env bash
# Create the compose stack's secret files with random values, keeping any that already exist:
# the database and Redis passwords, the bootstrap admin API key, the console's session key, the
# webhooks' signing keys, and the Grafana and Flower passwords.
#
# Usage: scripts/make-secrets.sh [DIR]   (default: deploy/secrets, which git ignores)
# The directory is private to its owner (0700); the files are readable (0444) because compose
# bind-mounts them into containers whose processes run as other users (1001, 999).
set -euo pipefail

DIR="${1:-$(dirname "$0")/../deploy/secrets}"
NAMES=(taskdock_database_password taskdock_broker_password taskdock_bootstrap_api_key taskdock_console_secret
    taskdock_webhook_secret taskdock_webhook_anonymous_secret grafana_admin_password flower_password)

random_text() { head -c "$1" /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }

install -d -m 0700 "$DIR"
for name in "${NAMES[@]}"; do
    file="$DIR/$name"
    if [[ -s $file ]]; then
        echo "kept    $file"
        continue
    fi
    if [[ $name == taskdock_bootstrap_api_key ]]; then
        # The format `taskdock keys create` prints: tdk_<8 hex id>_<secret>.
        value="tdk_$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')_$(random_text 32)"
    else
        # 32 URL-safe characters: no quoting surprises in connection URLs.
        value="$(random_text 24)"
    fi
    (umask 077 && printf '%s' "$value" >"$file")
    chmod 0444 "$file"
    echo "created $file"
done
