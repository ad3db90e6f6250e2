#!/bin/sh
# Container entrypoint: wait for the database and the broker, migrate if asked, then become the command.
#
#   TASKDOCK_WAIT_TIMEOUT      seconds to wait for the database and the broker (default 60; 0 = skip)
#   TASKDOCK_MIGRATE_ON_START  1 = run `taskdock migrate` before the command (default 0); the compose
#                              stack runs migrations once in its `migrate` service instead
#   --migrate                  as the first argument: the same as TASKDOCK_MIGRATE_ON_START=1
set -eu

migrate="${TASKDOCK_MIGRATE_ON_START:-0}"
if [ "${1:-}" = "--migrate" ]; then
    migrate=1
    shift
fi
[ "$#" -gt 0 ] || set -- taskdock api

# Only the roles that talk to the database or the broker wait; `taskdock --help`, a shell or a
# healthcheck command starts at once.
case "$1 ${2:-}" in
    "taskdock api" | "taskdock worker" | "taskdock dispatcher" | "taskdock migrate" | celery\ *)
        needs_services=1 ;;
    *)
        needs_services="$migrate" ;;
esac

if [ "$needs_services" = 1 ] && [ "${TASKDOCK_WAIT_TIMEOUT:-60}" != 0 ]; then
    taskdock wait --timeout "${TASKDOCK_WAIT_TIMEOUT:-60}"
fi
if [ "$migrate" = 1 ]; then
    taskdock migrate
fi

exec "$@"
