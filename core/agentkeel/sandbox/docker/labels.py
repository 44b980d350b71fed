"""Labels on our containers and images, and the sweep of orphans.

Every container the backend starts carries ``io.agentkeel.sandbox=1``, an
owner label naming the host process (``hostname:pid:start-time``) and a label
naming the backend instance (what its ``aclose`` removes, leaving other systems
of the same process alone). A container whose owner process on this host is
gone is an orphan of a crashed process and is removed when a backend starts
(on its first docker call). Containers owned by a live process (another replica
on the same daemon) or by another host are left alone.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

LABEL_SANDBOX = "io.agentkeel.sandbox"
LABEL_OWNER = "io.agentkeel.owner"
LABEL_IMAGE_KIND = "io.agentkeel.image"
LABEL_PLUGIN = "io.agentkeel.plugin"
LABEL_PLUGIN_DIST = "io.agentkeel.plugin.distribution"
LABEL_PLUGIN_VERSION = "io.agentkeel.plugin.version"
LABEL_AGENTKEEL_VERSION = "io.agentkeel.version"
LABEL_POOL = "io.agentkeel.pool"
LABEL_TOOL = "io.agentkeel.tool"
LABEL_BACKEND = "io.agentkeel.backend"  # one backend instance: what its aclose removes
LABEL_RUNNER = "io.agentkeel.runner"  # digest of the runner's build context (images)
LABEL_PROTOCOL = "io.agentkeel.protocol"  # the runner protocol an image speaks (sandbox_images/python/Dockerfile)

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    """The process start time in clock ticks (guards against pid reuse), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_id(pid: int | None = None) -> str:
    """``hostname:pid:start-time`` of this process (or of ``pid``)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '0'}"


def owner_alive(owner: str) -> bool | None:
    """True/False when ``owner`` is a process of this host; None when it is another host's."""
    host, _, rest = owner.partition(":")
    if host != socket.gethostname():
        return None
    pid_text, _, started = rest.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    current = _start_time(pid)
    return current is not None and (started in ("0", current))


def container_labels(owner: str, image: str, pooled: bool, tool: str = "", backend: str = "") -> dict[str, str]:
    labels = {LABEL_SANDBOX: "1", LABEL_OWNER: owner, LABEL_POOL: "1" if pooled else "0"}
    if tool:
        labels[LABEL_TOOL] = tool
    if backend:
        labels[LABEL_BACKEND] = backend
    return labels


def sweep_orphans(api: Any) -> list[str]:
    """Remove (force) every container of ours whose owner process on this host is gone.

    Returns the ids removed. Blocking: call it off the event loop.
    """
    removed: list[str] = []
    for info in api.containers(all=True, filters={"label": f"{LABEL_SANDBOX}=1"}):
        owner = (info.get("Labels") or {}).get(LABEL_OWNER, "")
        if owner_alive(owner) is not False:
            continue
        try:
            api.remove_container(info["Id"], force=True)
            removed.append(info["Id"])
        except Exception as exc:  # noqa: BLE001 - already gone, or being removed by the daemon
            log.debug("sweep: could not remove %s: %s", info["Id"][:12], exc)
    if removed:
        log.info("removed %d orphaned sandbox container(s) of crashed agentkeel processes", len(removed))
    return removed
