#!/usr/bin/env bash
# Make sure the local PostgreSQL, Redis and RabbitMQ the test suite uses are answering.
# Starts one that is down (never stops or flushes anything); fails if it cannot.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2
  for _ in $(seq 1 60); do
    port_open "$port" && { echo "$name: up on 127.0.0.1:$port"; return 0; }
    sleep 1
  done
  echo "$name: not answering on 127.0.0.1:$port after 60 s" >&2
  return 1
}

start_postgres() {
  command -v pg_ctlcluster >/dev/null || return 1
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
}

start_redis() {
  command -v redis-server >/dev/null || return 1
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
}

start_rabbitmq() {
  command -v rabbitmq-server >/dev/null || return 1
  rabbitmq-server -detached
}

ensure() {
  local name=$1 port=$2 starter=$3
  if port_open "$port"; then
    echo "$name: up on 127.0.0.1:$port"
    return 0
  fi
  echo "$name: down; starting it"
  "$starter" || { echo "$name: cannot start it here" >&2; return 1; }
  wait_port "$name" "$port"
}

ensure PostgreSQL 5432 start_postgres
ensure Redis 6379 start_redis
ensure RabbitMQ 5672 start_rabbitmq
