#!/usr/bin/env bash
# Create the compose stack's secret files with random values, keeping any that already exist.
#
# Usage: scripts/make-secrets.sh [DIR]   (default: deploy/secrets, which git ignores)
# The directory is private to its owner (0700); the files are readable (0444) because compose
# bind-mounts them into containers whose processes run as other users (1001, 999).
set -euo pipefail

DIR="${1:-$(dirname "$0")/../deploy/secrets}"
NAMES=(taskdock_database_password taskdock_broker_password)

install -d -m 0700 "$DIR"
for name in "${NAMES[@]}"; do
    file="$DIR/$name"
    if [[ -s $file ]]; then
        echo "kept    $file"
        continue
    fi
    # 32 URL-safe characters: no quoting surprises in connection URLs.
    (umask 077 && head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n' >"$file")
    chmod 0444 "$file"
    echo "created $file"
done
