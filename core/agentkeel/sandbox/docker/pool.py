"""The warm pool: containers started ahead of time, each used exactly once.

Containers are launched by worker threads (not event-loop tasks), so the pool
works whichever event loop calls it and survives a loop being closed. A taken
container is never returned: after its one call it is destroyed in the
background and a replacement is launched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from agentkeel.sandbox.docker.container import SandboxContainer

log = logging.getLogger(__name__)


class WarmPool:
    """Idle, started containers per image, refilled in the background.

    ``launch(image)`` creates one container (blocking); ``size_for(image)`` is
    the number to keep idle. Containers idle longer than ``max_idle_s`` are
    replaced rather than used.
    """

    def __init__(
        self,
        launch: Callable[[str], SandboxContainer],
        size_for: Callable[[str], int],
        *,
        max_idle_s: float = 600.0,
        workers: int = 4,
    ) -> None:
        self._launch = launch
        self._size_for = size_for
        self._max_idle_s = max_idle_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agentkeel-docker")
        self._lock = threading.Lock()
        self._idle: dict[str, deque[SandboxContainer]] = {}
        self._pending: dict[str, int] = {}
        self._errors: dict[str, str] = {}
        self._futures: set[Future[Any]] = set()
        self._closed = False

    def take(self, image: str) -> SandboxContainer | None:
        """An idle container for ``image`` (None when the pool is empty); schedules a refill."""
        stale: list[SandboxContainer] = []
        taken: SandboxContainer | None = None
        now = time.monotonic()
        with self._lock:
            queue = self._idle.setdefault(image, deque())
            while queue:
                candidate = queue.popleft()
                if now - candidate.created_at > self._max_idle_s or not candidate.connected():
                    stale.append(candidate)
                    continue
                taken = candidate
                break
        for container in stale:
            self.discard(container)
        self.fill(image)
        return taken

    def fill(self, image: str) -> None:
        """Launch containers in the background until ``size_for(image)`` are idle or starting."""
        with self._lock:
            if self._closed:
                return
            have = len(self._idle.get(image, ())) + self._pending.get(image, 0)
            need = max(self._size_for(image) - have, 0)
            self._pending[image] = self._pending.get(image, 0) + need
        for _ in range(need):
            self._submit(self._fill_one, image)

    def _fill_one(self, image: str) -> None:
        try:
            container = self._launch(image)
        except Exception as exc:  # noqa: BLE001 - a background launch reports in state(), never raises
            with self._lock:
                self._pending[image] -= 1
                self._errors[image] = f"{type(exc).__name__}: {exc}"
            log.warning("warm pool: cannot start a container of %s: %s", image, exc)
            return
        with self._lock:
            self._pending[image] -= 1
            self._errors.pop(image, None)
            closed = self._closed
            if not closed:
                self._idle.setdefault(image, deque()).append(container)
        if closed:
            container.destroy()

    def discard(self, container: SandboxContainer) -> None:
        """Destroy a used container in the background (inline once the pool is closed)."""
        if not self._submit(container.destroy):
            container.destroy()

    def _submit(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # executor shut down
            return False
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return True

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def idle_ids(self) -> set[str]:
        """Ids of the idle containers of every image."""
        with self._lock:
            return {c.id for queue in self._idle.values() for c in queue}

    def ready(self, image: str) -> int:
        with self._lock:
            return len(self._idle.get(image, ()))

    def wait_ready(self, image: str, timeout: float = 30.0) -> bool:
        """Block until the pool of ``image`` is full (or a launch failed); True when full."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                full = len(self._idle.get(image, ())) >= self._size_for(image)
                idle = not self._pending.get(image, 0)
            if full:
                return True
            if idle:
                return False
            time.sleep(0.02)
        return False

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until background launches and removals are done."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._futures:
                    return
            time.sleep(0.02)

    def state(self) -> dict[str, dict[str, Any]]:
        """Per image: idle containers, launches in flight, target size, last launch error."""
        with self._lock:
            images = set(self._idle) | set(self._pending)
            return {
                image: {
                    "idle": len(self._idle.get(image, ())),
                    "starting": self._pending.get(image, 0),
                    "size": self._size_for(image),
                    "last_error": self._errors.get(image),
                }
                for image in sorted(images)
            }

    def drain(self) -> None:
        """Stop refilling, destroy idle containers and wait for background work. Blocking."""
        with self._lock:
            self._closed = True
            idle = [c for queue in self._idle.values() for c in queue]
            self._idle.clear()
        for container in idle:
            container.destroy()
        self._executor.shutdown(wait=True)
