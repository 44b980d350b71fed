"""Build the sandbox image and per-plugin images, with or without a registry.

``build_sandbox_image`` picks its base: ``[sandbox.docker].base_image`` when
set, else ``python:3.12-slim`` when present locally, else the debootstrap base
``agentkeel/base:bookworm`` (built with ``sandbox_images/build-base-image.sh``
when missing and possible). Builds never pull (``pull=False``). Its context
(``sandbox_context``) is ``sandbox_images/python`` plus the result envelope
``agentkeel/sandbox/envelope.py``, and the image is labelled with a digest of
that context (``runner_digest``), so a stale image can be told apart.

``build_plugin_image`` installs the plugin, agentkeel and their dependencies
from wheels collected on the host (see ``wheels``) into the sandbox image, and
labels/tags the result with the plugin's name and version. Blocking functions.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import agentkeel.jsonvalue as jsonvalue
from agentkeel.errors import SandboxError
from agentkeel.markers import PROJECT_NAME
from agentkeel.sandbox import envelope
from agentkeel.sandbox.docker import labels as L
from agentkeel.sandbox.docker.images import (
    BASE_IMAGE,
    REGISTRY_BASE_IMAGE,
    SANDBOX_IMAGE,
    SANDBOX_REPO,
    PluginDist,
    agentkeel_version,
    entry_point_plugins,
    images_dir,
    plugin_image,
)
from agentkeel.sandbox.docker.wheels import PROBE, collect_wheels

Echo = Callable[[str], None]


def image_exists(api: Any, image: str) -> bool:
    import docker.errors

    try:
        api.inspect_image(image)
        return True
    except docker.errors.ImageNotFound:
        return False


def docker_build(api: Any, context: Path, tags: list[str], buildargs: dict[str, str], labels: dict[str, str],
                 echo: Echo) -> str:
    """``docker build`` of ``context`` without pulling; tags every name in ``tags``. Returns the image id."""
    image_id = ""
    for chunk in api.build(path=str(context), tag=tags[0], buildargs=buildargs, labels=labels, rm=True,
                           forcerm=True, pull=False, decode=True):
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message", chunk["error"])
            raise SandboxError(f"docker build of {tags[0]} failed: {detail}")
        text = chunk.get("stream", "").rstrip()
        if text:
            echo(text)
        aux = chunk.get("aux") or {}
        image_id = aux.get("ID", image_id)
    for tag in tags[1:]:
        repo, _, version = tag.rpartition(":")
        api.tag(tags[0], repo, version)
    return image_id


def build_base_image(echo: Echo, image: str = BASE_IMAGE) -> None:
    """Run ``build-base-image.sh`` (debootstrap; needs root). Idempotent."""
    script = images_dir() / "build-base-image.sh"
    proc = subprocess.run(["sh", str(script), image], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SandboxError(
            f"building the base image {image} failed:\n{proc.stderr[-2000:]}\nWith a registry, "
            f"`docker pull {REGISTRY_BASE_IMAGE}` instead; without one, run {script} as root (needs debootstrap)"
        )
    echo(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"base image {image} ready")


def choose_base(api: Any, configured: str | None, echo: Echo) -> str:
    """The base image for the sandbox image (see module docs)."""
    if configured:
        if not image_exists(api, configured):
            raise SandboxError(f"configured base image {configured} is not present; pull or build it first")
        return configured
    for candidate in (REGISTRY_BASE_IMAGE, BASE_IMAGE):
        if image_exists(api, candidate):
            return candidate
    echo(f"no {REGISTRY_BASE_IMAGE} and no {BASE_IMAGE}: building {BASE_IMAGE} with debootstrap")
    build_base_image(echo)
    return BASE_IMAGE


def sandbox_context(dest: Path) -> Path:
    """Write the sandbox image's build context into ``dest`` (created if needed) and return it:
    ``sandbox_images/python`` and, next to the runner, the envelope module it shares with the host."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(images_dir() / "python", dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(Path(envelope.__file__), dest / "envelope.py")
    return dest


def runner_digest(context: Path | None = None) -> str:
    """A digest of the sandbox image's build context (runner, envelope, installer, Dockerfile)."""
    if context is None:
        with tempfile.TemporaryDirectory(prefix="agentkeel-context-") as tmp:
            return runner_digest(sandbox_context(Path(tmp)))
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_runner_digest(api: Any, image: str) -> str | None:
    """The runner digest an image was built with (plugin images inherit it), None if unlabelled."""
    labels = (api.inspect_image(image).get("Config") or {}).get("Labels") or {}
    return labels.get(L.LABEL_RUNNER)


def build_sandbox_image(api: Any, echo: Echo, base_image: str | None = None) -> str:
    """Build ``agentkeel/sandbox-python`` (tags ``latest`` and the agentkeel version)."""
    base = choose_base(api, base_image, echo)
    version = agentkeel_version()
    tags = [SANDBOX_IMAGE, f"{SANDBOX_REPO}:{version}"]
    echo(f"building {SANDBOX_IMAGE} from {base}")
    with tempfile.TemporaryDirectory(prefix="agentkeel-build-") as tmp:
        context = sandbox_context(Path(tmp))
        labels = {L.LABEL_IMAGE_KIND: "sandbox", L.LABEL_AGENTKEEL_VERSION: version, "io.agentkeel.base": base,
                  L.LABEL_RUNNER: runner_digest(context)}
        docker_build(api, context, tags, {"BASE_IMAGE": base}, labels, echo)
    return SANDBOX_IMAGE


def probe_image(api: Any, image: str) -> dict[str, str]:
    """Python version, ABI, machine and libc of ``image`` (one throwaway container, no network)."""
    cid = api.create_container(
        image, entrypoint=["python3", "-I", "-c", PROBE], network_disabled=True,
        host_config=api.create_host_config(network_mode="none", read_only=True, cap_drop=["ALL"]),
    )["Id"]
    try:
        api.start(cid)
        status = api.wait(cid, timeout=60)
        out = api.logs(cid, stdout=True, stderr=False).decode()
        if status.get("StatusCode") != 0:
            raise SandboxError(f"cannot probe the Python of {image}: {api.logs(cid).decode()[-1000:]}")
    finally:
        api.remove_container(cid, force=True)
    try:
        found = jsonvalue.loads(out.strip().splitlines()[-1] if out.strip() else "", what=f"the probe of {image}",
                                max_bytes=64 * 1024)
    except jsonvalue.JSONValueError as exc:
        raise SandboxError(f"cannot probe the Python of {image}: {exc}") from None
    if not isinstance(found, dict):
        raise SandboxError(f"cannot probe the Python of {image}: it answered {found!r}")
    return found


def build_plugin_image(
    api: Any, plugin: str, echo: Echo, *, base_image: str | None = None, wheelhouse: Path | None = None
) -> str:
    """Build ``agentkeel/plugin-<plugin>:<version>`` (and ``:latest``) for an installed plugin."""
    plugins = entry_point_plugins()
    dist = plugins.get(plugin)
    if dist is None:
        known = ", ".join(sorted(plugins)) or "none"
        raise SandboxError(f"no installed agentkeel plugin named {plugin!r} (installed: {known}); pip install it first")
    if not image_exists(api, SANDBOX_IMAGE):
        build_sandbox_image(api, echo, base_image)
    target = probe_image(api, SANDBOX_IMAGE)
    echo(f"image Python {target['python_version']} ({target['machine']}, {target['libc']} {target['libc_version']})")
    with tempfile.TemporaryDirectory(prefix="agentkeel-build-") as tmp:
        context = Path(tmp)
        shutil.copy2(images_dir() / "plugin" / "Dockerfile", context / "Dockerfile")
        wheels = collect_wheels(["agentkeel", dist.distribution], target, context / "wheels", wheelhouse)
        echo(f"{len(wheels)} wheels: " + ", ".join(sorted(w.name for w in wheels)))
        (context / "preload").write_text(f"{dist.module}\n")
        return _build_plugin_context(api, context, dist, echo)


def _build_plugin_context(api: Any, context: Path, dist: PluginDist, echo: Echo) -> str:
    image = plugin_image(dist.plugin, dist.version)
    tags = [image, image.rsplit(":", 1)[0] + ":latest"]
    labels = {
        L.LABEL_IMAGE_KIND: "plugin",
        L.LABEL_PLUGIN: dist.plugin,
        L.LABEL_PLUGIN_DIST: dist.distribution,
        L.LABEL_PLUGIN_VERSION: dist.version,
        L.LABEL_AGENTKEEL_VERSION: agentkeel_version(),
    }
    echo(f"building {image}")
    docker_build(api, context, tags, {"SANDBOX_IMAGE": SANDBOX_IMAGE}, labels, echo)
    return image


def docker_tool_plugins() -> list[str]:
    """Names of installed entry-point plugins that register at least one docker tool.

    Reads each entry point's ``agentkeel_register_tools`` directly (no plugin
    manager): what matters is which installed plugins need an image. A hook that
    takes ``config`` gets the embedded defaults, so tools that come from a
    configuration (MCP servers) are not asked for: they are not built into images.
    A plugin that fails to load raises SandboxError naming it.
    """
    import inspect

    from agentkeel.config import Config
    from agentkeel.tools.decorator import spec_of

    found: set[str] = set()
    defaults: Config | None = None
    for ep in importlib.metadata.entry_points(group=PROJECT_NAME):
        try:
            plugin = ep.load()
            hook = getattr(plugin, "agentkeel_register_tools", None)
            specs: list[Any] = []
            if hook is not None:
                kwargs: dict[str, Any] = {"register": specs.append}
                if "config" in inspect.signature(hook).parameters:
                    defaults = defaults or Config.from_dict({}, "<embedded defaults>")
                    kwargs["config"] = defaults
                hook(**kwargs)
        except Exception as exc:
            raise SandboxError(
                f"plugin {ep.name!r} failed to load ({type(exc).__name__}: {exc}); fix or uninstall it, "
                f"or build one plugin's image with `agentkeel sandbox build PLUGIN`"
            ) from exc
        if any((spec := spec_of(obj)) is not None and spec.isolation == "docker" for obj in specs):
            found.add(ep.name)
    return sorted(found)
