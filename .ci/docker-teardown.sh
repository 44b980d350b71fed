#!/usr/bin/env bash
# Stop the Docker engine only if .ci/docker-setup.sh started it (pid file),
# after removing the sandbox containers left on it. Safe to call twice.
set -uo pipefail
STATE="${AGENTKEEL_CI_STATE:-${TMPDIR:-/tmp}/agentkeel-ci}"
PIDFILE="$STATE/dockerd.pid"
[ -f "$PIDFILE" ] || exit 0

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
PID="$(cat "$PIDFILE")"
ids="$(docker ps -aq --filter label=io.agentkeel.sandbox=1 2>/dev/null || true)"
if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    docker rm -f $ids >/dev/null 2>&1 || true
fi
if $SUDO kill -0 "$PID" 2>/dev/null; then
    echo "docker-teardown: stopping dockerd (pid $PID) started by docker-setup"
    $SUDO kill -TERM "$PID"
    for _ in $(seq 1 30); do
        $SUDO kill -0 "$PID" 2>/dev/null || break
        sleep 1
    done
fi
rm -f "$PIDFILE"
