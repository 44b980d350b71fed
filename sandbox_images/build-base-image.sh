#!/bin/sh
# Build a minimal Debian base image with python3, for machines that cannot pull
# from a container registry.  Needs root, debootstrap and a running Docker engine.
#
#   sandbox_images/build-base-image.sh [IMAGE]      (default: agentkeel/base:bookworm)
#
# Idempotent: does nothing when IMAGE already exists.  debootstrap uses its own
# default Debian mirror; no mirror is named here.
set -eu

IMAGE="${1:-agentkeel/base:bookworm}"
SUITE="${AGENTKEEL_BASE_SUITE:-bookworm}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE already exists; nothing to do"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "debootstrap is not installed: install it (apt-get install debootstrap) or pull a python image" >&2
    exit 1
fi
if [ "$(id -u)" != "0" ]; then
    echo "debootstrap needs root: run this script with sudo" >&2
    exit 1
fi

ROOTFS="$(mktemp -d /tmp/agentkeel-rootfs.XXXXXX)"
cleanup() { rm -rf "$ROOTFS"; }
trap cleanup EXIT INT TERM

echo "bootstrapping $SUITE into $ROOTFS (a few minutes)"
debootstrap --variant=minbase --include=python3 "$SUITE" "$ROOTFS"

# Strip what a sandbox never needs: apt caches and lists, docs, man pages, locales.
rm -rf "$ROOTFS"/var/cache/apt/* "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old
find "$ROOTFS"/usr/lib/python3* -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE"
echo "built base image $IMAGE"
