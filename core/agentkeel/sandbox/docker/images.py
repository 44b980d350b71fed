"""Image names and which image a tool runs in.

- ``agentkeel/base:bookworm``: a debootstrap-built base for machines without a
  registry (``sandbox_images/build-base-image.sh``).
- ``agentkeel/sandbox-python:latest`` (and ``:<agentkeel version>``): the
  generic sandbox image with the runner (``sandbox_images/python``).
- ``agentkeel/plugin-<plugin>:<version>`` (and ``:latest``): a plugin's tools
  with agentkeel and their dependencies, built by ``agentkeel sandbox build``.

A tool runs in ``spec.image`` when it names one; otherwise in its plugin's
image when the plugin comes from an installed distribution; otherwise in the
generic sandbox image (where only standard-library tools can be imported).
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import os
import re
from pathlib import Path

import attrs

from agentkeel.errors import SandboxError
from agentkeel.markers import PROJECT_NAME
from agentkeel.types import ToolSpec

BASE_IMAGE = "agentkeel/base:bookworm"
REGISTRY_BASE_IMAGE = "python:3.12-slim"
SANDBOX_REPO = "agentkeel/sandbox-python"
SANDBOX_IMAGE = f"{SANDBOX_REPO}:latest"
PLUGIN_REPO_PREFIX = "agentkeel/plugin-"


@attrs.frozen
class PluginDist:
    """An entry-point plugin and the distribution that provides it."""

    plugin: str
    module: str
    distribution: str
    version: str
    location: Path | None


def _tag_safe(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "x"


def plugin_image(plugin: str, version: str) -> str:
    """``agentkeel/plugin-<plugin>:<version>``."""
    return f"{PLUGIN_REPO_PREFIX}{_tag_safe(plugin)}:{_tag_safe(version)}"


def agentkeel_version() -> str:
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def entry_point_plugins() -> dict[str, PluginDist]:
    """Installed entry-point plugins of the ``agentkeel`` group, by plugin name."""
    found: dict[str, PluginDist] = {}
    for ep in importlib.metadata.entry_points(group=PROJECT_NAME):
        dist = ep.dist
        if dist is None:
            continue
        found[ep.name] = PluginDist(
            plugin=ep.name,
            module=ep.value.split(":", 1)[0],
            distribution=dist.metadata["Name"],
            version=dist.version,
            location=source_dir(dist),
        )
    return found


def source_dir(dist: importlib.metadata.Distribution) -> Path | None:
    """The local project directory of an editable or local-path install, else None."""
    import json

    text = dist.read_text("direct_url.json")
    if not text:
        return None
    try:
        url = json.loads(text).get("url", "")
    except ValueError:
        return None
    if url.startswith("file://"):
        path = Path(url[len("file://") :])
        if (path / "pyproject.toml").is_file() or (path / "setup.py").is_file():
            return path
    return None


def image_for(spec: ToolSpec, default_image: str | None = None) -> str:
    """The image ``spec`` runs in (see module docs)."""
    if spec.image:
        return spec.image
    dist = entry_point_plugins().get(spec.plugin) if spec.plugin else None
    if dist is not None:
        return plugin_image(dist.plugin, dist.version)
    return default_image or SANDBOX_IMAGE


def _build_command(image: str) -> str | None:
    """The ``agentkeel sandbox build`` command that makes ``image``, when agentkeel builds it."""
    if image.startswith(PLUGIN_REPO_PREFIX):
        plugin = image[len(PLUGIN_REPO_PREFIX) :].split(":", 1)[0]
        return f"agentkeel sandbox build {plugin}"
    if image.startswith(SANDBOX_REPO):
        return "agentkeel sandbox build"
    return None


def missing_image_advice(image: str) -> str:
    command = _build_command(image)
    if command is not None:
        return f"build it with `{command}`"
    return "pull or build it, or remove image= from the tool to use its plugin's image"


def stale_image_advice(image: str) -> str:
    """How to replace ``image`` when it was built for another runner protocol."""
    command = _build_command(image)
    if command is not None:
        return f"rebuild it with `{command}`"
    return "rebuild it from the current agentkeel/sandbox-python image (`agentkeel sandbox build` first)"


def protocol_problem(image: str, labels: dict[str, str] | None) -> str | None:
    """Why ``image`` cannot serve this agentkeel, judged by its ``io.agentkeel.protocol`` label (None: fine).

    An image without the label (not built from sandbox_images/python) is left to the runner's reply.
    """
    from agentkeel.sandbox.docker.labels import LABEL_PROTOCOL
    from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL

    found = (labels or {}).get(LABEL_PROTOCOL)
    if found is None or found == str(RUNNER_PROTOCOL):
        return None
    return (f"sandbox image {image} was built for runner protocol {found}, this agentkeel speaks "
            f"{RUNNER_PROTOCOL}; {stale_image_advice(image)}")


IMAGES_PACKAGE = "agentkeel.sandbox_images"


def _is_images_dir(path: Path) -> bool:
    return (path / "python" / "Dockerfile").is_file() and (path / "python" / "runner.py").is_file()


def images_dir() -> Path:
    """The ``sandbox_images`` directory (Dockerfiles, runner, wheel installer, base-image script).

    ``$AGENTKEEL_SANDBOX_IMAGES`` wins; then the copy installed with agentkeel
    (package data ``agentkeel/sandbox_images``; in an editable install, the
    checkout's top-level ``sandbox_images/``); then the folder of a source
    checkout the package is imported from. Raises SandboxError when none exists.
    """
    env = os.environ.get("AGENTKEEL_SANDBOX_IMAGES")
    if env:
        if _is_images_dir(Path(env)):
            return Path(env)
        raise SandboxError(f"AGENTKEEL_SANDBOX_IMAGES={env} has no python/Dockerfile and python/runner.py")
    candidates: list[Path] = []
    try:
        packaged = importlib.resources.files(IMAGES_PACKAGE)
    except ModuleNotFoundError:
        pass
    else:
        if isinstance(packaged, Path):  # a folder on disk (not inside a zip file)
            candidates.append(packaged)
    checkout = Path(__file__).resolve().parents[4]  # <checkout>/core/agentkeel/sandbox/docker/images.py
    candidates.append(checkout / "sandbox_images")
    for candidate in candidates:
        if _is_images_dir(candidate):
            return candidate
    raise SandboxError(
        "cannot find the sandbox images (Dockerfiles and runner) that ship with agentkeel; reinstall "
        "agentkeel, or set AGENTKEEL_SANDBOX_IMAGES to the sandbox_images/ folder of an agentkeel checkout"
    )
