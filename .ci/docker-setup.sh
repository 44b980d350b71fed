#!/usr/bin/env bash
# Make a Docker engine available and build the sandbox images (idempotent).
#
# - When `docker info` fails: install docker.io (and debootstrap) with apt-get if
#   dockerd is missing, start dockerd in the background and record its pid in
#   $AGENTKEEL_CI_STATE/dockerd.pid, so .ci/docker-teardown.sh stops only a
#   daemon this script started; then wait until the engine answers.
# - Build the base image with debootstrap when no python:3.12-slim is present,
#   then `agentkeel sandbox build` (sandbox image + images of installed plugins
#   with docker tools). Existing images are reused (docker layer cache).
#
# Uses $PYTHON (default: `python`, the active virtualenv) to run agentkeel.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${AGENTKEEL_CI_STATE:-${TMPDIR:-/tmp}/agentkeel-ci}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$STATE"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

apt_install() {
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$@"
}

if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null 2>&1; then
        echo "docker-setup: installing docker.io"
        apt_install docker.io
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "docker-setup: starting dockerd (log: $STATE/dockerd.log)"
        $SUDO sh -c "nohup dockerd >'$STATE/dockerd.log' 2>&1 & echo \$! >'$STATE/dockerd.pid'"
        for _ in $(seq 1 60); do
            if docker info >/dev/null 2>&1; then break; fi
            sleep 1
        done
    fi
fi
if ! docker info >/dev/null 2>&1; then
    echo "docker-setup: the Docker engine does not answer; see $STATE/dockerd.log" >&2
    tail -n 30 "$STATE/dockerd.log" 2>/dev/null >&2 || true
    exit 1
fi
echo "docker-setup: $(docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}')"

if ! docker image inspect python:3.12-slim >/dev/null 2>&1; then
    if ! docker image inspect agentkeel/base:bookworm >/dev/null 2>&1; then
        if ! command -v debootstrap >/dev/null 2>&1; then
            echo "docker-setup: installing debootstrap"
            apt_install debootstrap
        fi
        $SUDO sh "$ROOT/sandbox_images/build-base-image.sh" agentkeel/base:bookworm
    fi
fi

"$PYTHON" -m agentkeel sandbox build --quiet
