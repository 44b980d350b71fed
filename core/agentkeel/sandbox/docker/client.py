"""A lazily connected Docker API client with errors that say what to do."""

from __future__ import annotations

import threading
from typing import Any

from agentkeel.errors import SandboxError

DAEMON_ADVICE = (
    "start the Docker engine (e.g. `sudo systemctl start docker`, or `sudo dockerd &`), make sure this "
    "user may use it (member of the `docker` group, or DOCKER_HOST set), then check with "
    "`agentkeel sandbox doctor`"
)


def connect(base_url: str | None = None, timeout: float = 30.0) -> Any:
    """A low-level ``docker.APIClient`` that has answered a ping. Raises SandboxError."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a dependency of agentkeel
        raise SandboxError(f"the `docker` Python package is not installed ({exc}); pip install docker") from exc
    try:
        if base_url:
            api = docker.APIClient(base_url=base_url, version="auto", timeout=timeout)
        else:
            api = docker.from_env(version="auto", timeout=timeout).api
        api.ping()
    except Exception as exc:
        raise SandboxError(f"cannot reach the Docker engine ({type(exc).__name__}: {exc}); {DAEMON_ADVICE}") from exc
    return api


class LazyClient:
    """Connects on first use, so the plugin loads on machines without Docker."""

    def __init__(self, base_url: str | None = None) -> None:
        self.base_url = base_url
        self._api: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        """The connected ``APIClient``; raises SandboxError with advice when unreachable. Blocking."""
        with self._lock:
            if self._api is None:
                self._api = connect(self.base_url)
            return self._api

    @property
    def connected(self) -> bool:
        return self._api is not None

    def close(self) -> None:
        with self._lock:
            if self._api is not None:
                try:
                    self._api.close()
                finally:
                    self._api = None
