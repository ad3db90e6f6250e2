#!/bin/sh
# As the official image: bare options go to redis-server, which runs as uid 999 in /data.
set -eu

case "${1:-}" in
    -* | *.conf) set -- redis-server "$@" ;;
esac

if [ "${1:-}" = redis-server ]; then
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
    fi
    shift
    # Debian's build protects a password-less server; the official build does not by default.
    set -- redis-server --protected-mode no "$@"
fi
umask 0077
exec "$@"
