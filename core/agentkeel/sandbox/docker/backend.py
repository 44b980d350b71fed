"""The ``docker`` sandbox backend: one hardened, single-use container per call.

A call takes a warm container for its image (or starts one cold), writes the
request to the runner's stdin through the attach socket and reads the one-line
result from its stdout. The deadline is enforced twice: by the runner inside
(``deadline_s``) and here (``timeout + grace_s``), after which the container is
killed and removed. Cancelling the awaiting task kills the container too. All
Docker SDK calls run in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from agentkeel.sandbox.docker import protocol
from agentkeel.sandbox.docker.client import LazyClient
from agentkeel.sandbox.docker.container import Exchange, SandboxContainer
from agentkeel.sandbox.docker.images import SANDBOX_IMAGE, image_for, missing_image_advice
from agentkeel.sandbox.docker.labels import container_labels, owner_id, sweep_orphans
from agentkeel.sandbox.docker.pool import WarmPool
from agentkeel.sandbox.docker.settings import DockerSettings, Limits
from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.types import ToolSpec

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0


def container_was_fresh(container: SandboxContainer) -> bool:
    """True when ``container`` was started for this call (not taken from the pool)."""
    return time.monotonic() - container.created_at < 1.0 and not container.ready_seen


class DockerBackend:
    """Runs ``isolation="docker"`` tools in containers. Connects to Docker lazily."""

    strength = 20

    def __init__(self, settings: DockerSettings | None = None) -> None:
        self.settings = settings or DockerSettings()
        self.client = LazyClient(self.settings.base_url)
        self.owner = owner_id()
        self.pool = WarmPool(self._launch_pooled, self.settings.pool_size_for)
        self._images_seen: set[str] = set()
        self._image_cache: dict[tuple[str, str | None], str] = {}
        self._closed = False

    # --- public API ---------------------------------------------------------------

    def image_for(self, spec: ToolSpec) -> str:
        """The image ``spec`` runs in (cached: resolving reads installed metadata)."""
        key = (spec.plugin, spec.image)
        image = self._image_cache.get(key)
        if image is None:
            image = self._image_cache[key] = image_for(spec, self.settings.sandbox_image)
        return image

    async def run(self, call: ToolCall) -> Any:
        """Run ``call`` in a container; its JSON result, or ToolError/ToolTimeoutError/SandboxError."""
        spec = call.spec
        limits = self.settings.limits_for(spec.name)
        request = protocol.tool_request(spec.qualified_name, call.args, spec.is_async, call.timeout, limits)
        reply = await self._execute(self.image_for(spec), request, call.timeout, limits, f"tool {spec.name!r}", spec.name)
        return reply.get("value")

    async def run_code(self, code: str, *, timeout: float = 30.0, image: str | None = None) -> dict[str, Any]:
        """Run Python source in a fresh container: stdout, stderr, exit_code, duration_s."""
        limits = self.settings.limits
        request = protocol.code_request(code, timeout, limits)
        reply = await self._execute(image or self.settings.sandbox_image or SANDBOX_IMAGE, request, timeout, limits, "code")
        return {
            "stdout": reply.get("stdout", ""),
            "stderr": reply.get("stderr", ""),
            "exit_code": reply.get("exit_code"),
            "duration_s": reply.get("duration_s"),
        }

    async def start(self, specs: Iterable[ToolSpec] = ()) -> None:
        """Sweep orphans of crashed processes and fill the warm pools of the images of
        ``specs`` (docker tools) and of ``prewarm``. Logs instead of failing when Docker is away."""
        images = {self.image_for(s) for s in specs if s.isolation == "docker"} | set(self.settings.prewarm)
        try:
            await asyncio.to_thread(self._start_blocking, sorted(images))
        except SandboxError as exc:
            (log.warning if images else log.debug)("docker sandbox not started: %s", exc)

    def _start_blocking(self, images: list[str]) -> None:
        api = self.client.get()
        sweep_orphans(api)
        for image in images:
            try:
                self._ensure_image(api, image)
            except SandboxError as exc:
                log.warning("warm pool for %s not filled: %s", image, exc)
                continue
            self.pool.fill(image)

    async def prewarm(self, image: str, timeout: float = 60.0) -> bool:
        """Fill the pool of ``image`` and wait until it is full; True when it is."""
        api = await asyncio.to_thread(self.client.get)
        await asyncio.to_thread(self._ensure_image, api, image)
        self.pool.fill(image)
        return await asyncio.to_thread(self.pool.wait_ready, image, timeout)

    def pool_state(self) -> dict[str, dict[str, Any]]:
        return self.pool.state()

    async def aclose(self) -> None:
        """Destroy idle and in-flight containers of this backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._close_blocking)

    def _close_blocking(self) -> None:
        self.pool.drain()
        if self.client.connected:
            try:
                api = self.client.get()
                for info in api.containers(all=True, filters={"label": f"io.agentkeel.owner={self.owner}"}):
                    api.remove_container(info["Id"], force=True)
            except Exception as exc:
                log.debug("docker sandbox close: %s", exc)
        self.client.close()

    # --- one call -------------------------------------------------------------------

    async def _execute(
        self, image: str, request: bytes, timeout: float, limits: Limits, label: str, tool: str = ""
    ) -> dict[str, Any]:
        if self._closed:
            raise SandboxError("the docker sandbox backend is closed; create a new AgentSystem")
        cancelled = threading.Event()
        holder: list[SandboxContainer] = []
        try:
            exchange, state = await asyncio.to_thread(
                self._call_blocking, image, request, timeout, limits, tool, holder, cancelled
            )
        except asyncio.CancelledError:
            cancelled.set()
            if holder:
                await asyncio.shield(asyncio.to_thread(holder[0].destroy))
            raise
        return self._interpret(exchange, state, label, timeout, limits)

    def _call_blocking(
        self,
        image: str,
        request: bytes,
        timeout: float,
        limits: Limits,
        tool: str,
        holder: list[SandboxContainer],
        cancelled: threading.Event,
    ) -> tuple[Exchange, dict[str, Any] | None]:
        api = self.client.get()
        self._ensure_image(api, image)
        pooled = limits == self.settings.limits and self.settings.pool_size_for(image) > 0
        container = self.pool.take(image) if pooled else None
        if container is None:
            container = self._launch(api, image, limits, pooled=False, tool=tool)
        holder.append(container)
        if cancelled.is_set():
            container.destroy()
            raise SandboxError("cancelled")
        deadline = time.monotonic() + timeout + self.settings.grace_s
        try:
            exchange = container.exchange(request, deadline, protocol.max_reply_bytes(limits))
        except OSError as exc:
            container.destroy()
            if not container_was_fresh(container):  # a pooled container died while idle: go cold once
                container = self._launch(api, image, limits, pooled=False, tool=tool)
                holder[:] = [container]
                exchange = container.exchange(request, deadline, protocol.max_reply_bytes(limits))
            else:
                raise SandboxError(f"lost the connection to the sandbox container ({exc}); is the daemon healthy?") from exc
        state = None
        if exchange.timed_out or exchange.overflow or cancelled.is_set():
            container.destroy()
        elif exchange.eof:
            state = container.state()
            container.destroy()
        else:
            self.pool.discard(container)
        return exchange, state

    def _interpret(
        self, ex: Exchange, state: dict[str, Any] | None, label: str, timeout: float, limits: Limits
    ) -> dict[str, Any]:
        if ex.timed_out:
            raise ToolTimeoutError(f"{label} ran past its timeout of {timeout:g}s; its container was killed")
        if ex.overflow:
            raise ToolError(f"{label}: the sandbox wrote more output than allowed; its container was killed", retryable=False)
        if ex.eof:
            if state and state.get("OOMKilled"):
                raise ToolError(
                    f"{label}: out of memory (limit {limits.memory // 1024**2} MiB); the container was killed",
                    retryable=False,
                )
            code = state.get("ExitCode") if state else None
            tail = ex.stderr.decode("utf-8", "replace")[-1000:]
            raise ToolError(
                f"{label}: the sandbox ended without a result (exit code {code}); the tool may have killed "
                f"its runner" + (f"\nstderr (tail):\n{tail}" if tail.strip() else ""),
                retryable=False,
            )
        reply = protocol.parse_reply(ex, label)
        if not reply.get("ok"):
            protocol.raise_for_reply(reply, label, limits)
        return reply

    # --- containers -------------------------------------------------------------------

    def _ensure_image(self, api: Any, image: str) -> None:
        if image in self._images_seen:
            return
        import docker.errors

        try:
            api.inspect_image(image)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(f"sandbox image {image} is not present; {missing_image_advice(image)}") from exc
        except docker.errors.APIError as exc:
            raise SandboxError(f"cannot inspect sandbox image {image}: {exc}") from exc
        self._images_seen.add(image)

    def _launch(self, api: Any, image: str, limits: Limits, *, pooled: bool, tool: str = "") -> SandboxContainer:
        import docker.errors

        labels = container_labels(self.owner, image, pooled, tool)
        try:
            return SandboxContainer.launch(api, image, self.settings, limits, labels)
        except docker.errors.APIError as exc:
            raise SandboxError(f"cannot start a sandbox container of {image}: {exc}") from exc

    def _launch_pooled(self, image: str) -> SandboxContainer:
        """A container whose runner has started and preloaded, ready to answer at once."""
        container = self._launch(self.client.get(), image, self.settings.limits, pooled=True)
        if not container.wait_ready(READY_TIMEOUT_S):
            state = container.state(wait_s=0.1)
            container.destroy()
            raise SandboxError(
                f"the runner in {image} did not become ready within {READY_TIMEOUT_S:g}s (state {state.get('Status')}, "
                f"exit code {state.get('ExitCode')}); rebuild the image with `agentkeel sandbox build`"
            )
        return container
