"""Default plugin: the ``docker`` sandbox backend.

Registers a ``DockerBackend`` configured from ``[sandbox.docker]`` and nothing
else. Importing and registering never touch Docker, so systems without a Docker
engine load fine. The backend starts on its own first docker call (it sweeps
orphaned containers of crashed processes and fills its warm pools then), so a
request that uses no docker tool never contacts Docker; the host closes it
(``aclose``) with the system, which drains its pools and removes its containers.
Each system gets its own backend: nothing is kept in this module.
"""

from __future__ import annotations

from collections.abc import Callable

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.sandbox.docker import DockerBackend, DockerSettings


@hookimpl
def agentkeel_register_sandboxes(register: Callable[..., None], config: Config) -> None:
    register("docker", DockerBackend(DockerSettings.from_config(config.section("sandbox", "docker"))))
