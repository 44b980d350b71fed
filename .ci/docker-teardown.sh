#!/usr/bin/env bash
# Stop the Docker engine only if .ci/docker-setup.sh started it (its pid file in
# $AGENTKEEL_CI_STATE), after removing the sandbox containers left on it.
# Safe to call twice; never stops a dockerd it has no pid file for, nor a
# process that is no longer a dockerd (pid reuse).
set -uo pipefail
STATE="${AGENTKEEL_CI_STATE:-${TMPDIR:-/tmp}/agentkeel-ci}"
PIDFILE="$STATE/dockerd.pid"
if [ ! -f "$PIDFILE" ]; then
    rmdir "$STATE" 2>/dev/null || true  # an empty state directory of a run that started nothing
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
PID="$(cat "$PIDFILE")"
if [ "$($SUDO cat "/proc/$PID/comm" 2>/dev/null)" != "dockerd" ]; then
    echo "docker-teardown: pid $PID is not a running dockerd any more; nothing to stop"
    rm -f "$PIDFILE"
    exit 0
fi
ids="$(docker ps -aq --filter label=io.agentkeel.sandbox=1 2>/dev/null || true)"
if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    docker rm -f $ids >/dev/null 2>&1 || true
fi
echo "docker-teardown: stopping dockerd (pid $PID) started by docker-setup"
$SUDO kill -TERM "$PID"
for _ in $(seq 1 30); do
    $SUDO kill -0 "$PID" 2>/dev/null || break
    sleep 1
done
rm -f "$PIDFILE"
