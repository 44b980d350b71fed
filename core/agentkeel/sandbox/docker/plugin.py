"""Default plugin: the ``docker`` sandbox backend.

Registers a ``DockerBackend`` configured from ``[sandbox.docker]``. Importing and
registering never touch Docker, so systems without a Docker engine load fine;
the engine is contacted on the first docker-isolated call (which then fails
with ``SandboxError`` and advice) or at start-up, where orphaned containers of
crashed processes are swept and the warm pools of the registered docker tools'
images are filled (a missing engine there is only logged). Shutdown drains the
pools and removes this process's containers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

from agentkeel.config import Config
from agentkeel.sandbox.docker import DockerBackend, DockerSettings
from agentkeel.markers import hookimpl
from agentkeel.types import ToolSpec

# Backends by the id of the Config they were built from, so the lifecycle hooks
# of one AgentSystem find its own backend (a weak reference guards id reuse).
_BACKENDS: dict[int, tuple[Callable[[], Any], DockerBackend]] = {}


def _remember(config: Config, backend: DockerBackend) -> None:
    try:
        ref: Callable[[], Any] = weakref.ref(config)
    except TypeError:
        ref = lambda: config
    for key in [k for k, (r, _) in _BACKENDS.items() if r() is None]:
        del _BACKENDS[key]
    _BACKENDS[id(config)] = (ref, backend)


def backend_for(system: Any) -> DockerBackend | None:
    """The docker backend registered for ``system`` (None if another plugin replaced it)."""
    registered = getattr(system, "sandboxes", {}).get("docker")
    if isinstance(registered, DockerBackend):
        return registered
    config = getattr(system, "config", None)
    entry = _BACKENDS.get(id(config))
    if entry is not None and entry[0]() is config and registered is None:
        return entry[1]
    return None


def _docker_specs(system: Any) -> Iterable[ToolSpec]:
    tools: Any = getattr(system, "tools", None)
    if hasattr(tools, "all"):
        specs: Iterable[Any] = tools.all().values()
    elif isinstance(tools, dict):
        specs = tools.values()
    else:
        specs = ()
    return [s for s in specs if isinstance(s, ToolSpec) and s.isolation == "docker"]


@hookimpl
def agentkeel_register_sandboxes(register: Callable[[str, Any], None], config: Config) -> None:
    backend = DockerBackend(DockerSettings.from_config(config.section("sandbox", "docker")))
    _remember(config, backend)
    register("docker", backend)


@hookimpl
async def agentkeel_startup(system: Any) -> None:
    backend = backend_for(system)
    if backend is not None:
        await backend.start(_docker_specs(system))


@hookimpl
async def agentkeel_shutdown(system: Any) -> None:
    backend = backend_for(system)
    if backend is not None:
        await backend.aclose()
        _BACKENDS.pop(id(getattr(system, "config", None)), None)
