"""``agentkeel sandbox doctor``: is the docker sandbox usable here, and if not, why.

Each check yields a ``Check`` (name, ok, detail, advice). Checks: the engine
answers, its API version, the runc version, cgroup driver/version, the sandbox
and plugin images present, orphaned containers, and a live hardened round trip
through the runner. Blocking.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from agentkeel.errors import AgentkeelError, SandboxError
from agentkeel.sandbox.docker.build import docker_tool_plugins, image_exists, image_runner_digest, runner_digest
from agentkeel.sandbox.docker.client import DAEMON_ADVICE, connect
from agentkeel.sandbox.docker.images import (
    BASE_IMAGE,
    REGISTRY_BASE_IMAGE,
    SANDBOX_IMAGE,
    entry_point_plugins,
    plugin_image,
    protocol_problem,
)
from agentkeel.sandbox.docker.labels import LABEL_SANDBOX, owner_alive


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str = ""
    advice: str = ""


def run_checks(base_url: str | None = None, round_trip: bool = True) -> Iterator[Check]:
    """Every doctor check in order; stops after the first check when the engine is unreachable."""
    try:
        api = connect(base_url, timeout=10)
    except SandboxError as exc:
        yield Check("engine", False, str(exc).split(";")[0], DAEMON_ADVICE)
        return
    version = api.version()
    yield Check("engine", True, f"Docker {version.get('Version')} at {api.base_url}")
    yield Check("api version", True, f"client {api.api_version}, server {version.get('ApiVersion')} "
                                     f"(min {version.get('MinAPIVersion')})")
    info = api.info()
    runc = (info.get("RuncCommit") or {}).get("ID", "unknown")
    components = {c.get("Name"): c.get("Version") for c in version.get("Components") or []}
    yield Check("runc", True, f"runc {components.get('runc', runc)}; default runtime {info.get('DefaultRuntime')}")
    yield Check("cgroups", True, f"cgroup v{info.get('CgroupVersion', '1')}, driver {info.get('CgroupDriver')}")
    if not info.get("MemoryLimit", True) or not info.get("PidsLimit", True):
        yield Check("limits", False, "the engine cannot enforce memory or pids limits",
                    "enable the memory and pids cgroup controllers on the host (kernel command line)")
    yield from _image_checks(api)
    yield _orphan_check(api)
    if round_trip and image_exists(api, SANDBOX_IMAGE):
        yield _round_trip(base_url)


def _image_checks(api: Any) -> Iterator[Check]:
    base = [name for name in (REGISTRY_BASE_IMAGE, BASE_IMAGE) if image_exists(api, name)]
    yield Check("base image", bool(base), ", ".join(base) or "none",
                "" if base else f"`docker pull {REGISTRY_BASE_IMAGE}`, or without a registry run "
                                "sandbox_images/build-base-image.sh as root (debootstrap)")
    current = runner_digest()
    ok = image_exists(api, SANDBOX_IMAGE)
    yield _image_check("sandbox image", api, SANDBOX_IMAGE, ok, current, "run `agentkeel sandbox build`")
    try:
        wanted = docker_tool_plugins()
    except AgentkeelError as exc:
        yield Check("plugin images", False, f"cannot load plugins: {exc}", "fix the plugin error first")
        return
    dists = entry_point_plugins()
    for plugin in wanted:
        image = plugin_image(plugin, dists[plugin].version)
        yield _image_check(f"plugin image {plugin}", api, image, image_exists(api, image), current,
                           f"run `agentkeel sandbox build {plugin}`")


def _image_check(name: str, api: Any, image: str, exists: bool, current: str, advice: str) -> Check:
    if not exists:
        return Check(name, False, f"{image} missing", advice)
    stale = protocol_problem(image, (api.inspect_image(image).get("Config") or {}).get("Labels"))
    if stale:
        return Check(name, False, stale.split(";")[0], advice)
    if image_runner_digest(api, image) != current:
        return Check(name, False, f"{image} was built with another runner than this agentkeel's", advice)
    return Check(name, True, image)


def _orphan_check(api: Any) -> Check:
    containers = api.containers(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
    orphans = [c for c in containers if owner_alive((c.get("Labels") or {}).get("io.agentkeel.owner", "")) is False]
    live = len(containers) - len(orphans)
    detail = f"{live} in use by live processes, {len(orphans)} orphaned"
    return Check("containers", not orphans, detail,
                 "" if not orphans else "they are removed by the next docker call of agentkeel; or `docker rm -f` them")


def _round_trip(base_url: str | None) -> Check:
    import asyncio

    from agentkeel.sandbox.docker.backend import DockerBackend
    from agentkeel.sandbox.docker.settings import DockerSettings

    async def go() -> dict[str, Any]:
        backend = DockerBackend(DockerSettings(pool_size=0, base_url=base_url))
        try:
            return await backend.run_code(
                # The network is judged by what the container has (interfaces), never by sending traffic.
                "import os, socket\nprint(os.getuid())\n"
                "names = sorted(n for _, n in socket.if_nameindex())\n"
                "print('nonet' if names == ['lo'] else 'net:' + ','.join(names))",
                timeout=20,
            )
        finally:
            await backend.aclose()

    try:
        result = asyncio.run(go())
    except AgentkeelError as exc:
        return Check("round trip", False, str(exc), "rebuild the images with `agentkeel sandbox build`")
    lines = result["stdout"].split()
    ok = lines[:1] != ["0"] and "nonet" in lines
    return Check("round trip", ok, f"ran as uid {lines[:1]}, network {'blocked' if 'nonet' in lines else 'OPEN'}, "
                                   f"{result['duration_s']}s in the runner",
                 "" if ok else "the sandbox is not hardened as expected: report this as a bug")


def pool_state(sandboxes: Mapping[str, Any]) -> dict[str, Any]:
    """Warm pool state of the docker backend among a system's ``sandboxes`` ({} when there is none)."""
    from agentkeel.sandbox.docker.backend import DockerBackend

    backend = sandboxes.get("docker")
    return backend.pool_state() if isinstance(backend, DockerBackend) else {}
