"""The Docker execution sandbox: hardened single-use containers, a warm pool,
offline-built images and a doctor. See ``sandbox_images/README.md``."""

from agentkeel.sandbox.docker.backend import DockerBackend
from agentkeel.sandbox.docker.settings import DockerSettings, Limits

__all__ = ["DockerBackend", "DockerSettings", "Limits"]
