"""The ``docker`` sandbox backend: one hardened, single-use container per call.

A call takes a warm container for its image (or starts one cold), writes the
request to the runner's stdin through the attach socket and reads the one-line
result from its stdout, authenticated with a key drawn for that call
(``protocol``). The runner is the container's PID 1 (no init process) and
non-dumpable, so nothing else in the container can write to that stdout.
The deadline is enforced twice: by the runner inside (``deadline_s``) and
here (``timeout + grace_s``), after which the container is killed and removed.
Cancelling the awaiting task kills the container too. All Docker SDK calls run
in threads, never on the event loop.

The backend starts lazily, on its first docker call: it connects to the
engine, removes orphaned containers of crashed processes and fills the warm
pools of ``[sandbox.docker] prewarm`` (a pool of any other image fills once the
image is first used). A system whose requests use no docker tool never
contacts Docker. When the engine cannot be reached the call fails with a
``SandboxError`` that says what to do, and one short warning is logged.
``aclose`` (called by the host when the system closes) removes the containers
of this backend instance only.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Generic, TypeVar

from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.sandbox.docker import protocol
from agentkeel.sandbox.docker.client import LazyClient
from agentkeel.sandbox.docker.container import Exchange, SandboxContainer
from agentkeel.sandbox.docker.images import SANDBOX_IMAGE, image_for, missing_image_advice, protocol_problem
from agentkeel.sandbox.docker.labels import LABEL_BACKEND, container_labels, owner_id, sweep_orphans
from agentkeel.sandbox.docker.pool import WarmPool
from agentkeel.sandbox.docker.settings import DockerSettings, Limits
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.types import ToolSpec

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
REFUSAL = "agentkeel runner: refusing to serve:"  # sandbox_images/python/runner.py, on stderr
MAX_CACHED_IMAGES = 256
UNREACHABLE_WARNING = "docker sandbox unavailable: cannot reach the Docker engine; see `agentkeel sandbox doctor`"

K = TypeVar("K")
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """A thread-safe mapping that forgets its least recently used entry past ``maxsize``."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


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
        self.instance = uuid.uuid4().hex[:16]
        self.pool = WarmPool(self._launch_pooled, self.settings.pool_size_for)
        self._images_seen: BoundedCache[str, bool] = BoundedCache(MAX_CACHED_IMAGES)
        self._image_cache: BoundedCache[tuple[str, str | None], str] = BoundedCache(MAX_CACHED_IMAGES)
        self._start_lock = threading.Lock()
        self._started = False
        self._warned = False
        self._closed = False

    # --- public API ---------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the backend has started (connected, swept orphans, filled the prewarm pools)."""
        return self._started

    def image_for(self, spec: ToolSpec) -> str:
        """The image ``spec`` runs in (cached: resolving reads installed metadata)."""
        key = (spec.plugin, spec.image)
        image = self._image_cache.get(key)
        if image is None:
            image = image_for(spec, self.settings.sandbox_image)
            self._image_cache.put(key, image)
        return image

    async def run(self, call: ToolCall) -> Any:
        """Run ``call`` in a container; its JSON result, or ToolError/ToolTimeoutError/SandboxError."""
        spec = call.spec
        label = f"tool {spec.name!r}"
        limits = self.settings.limits_for(spec.name)
        request = protocol.tool_request(spec.qualified_name, call.args, spec.is_async, call.timeout, limits)
        reply = await self._execute(self.image_for(spec), request, call.timeout, limits, label, spec.name)
        return protocol.value_of(reply, label, limits)

    async def run_code(self, code: str, *, timeout: float = 30.0, image: str | None = None) -> dict[str, Any]:
        """Run Python source in a fresh container: stdout, stderr, exit_code, duration_s."""
        limits = self.settings.limits
        request = protocol.code_request(code, timeout, limits)
        image = image or self.settings.sandbox_image or SANDBOX_IMAGE
        reply = await self._execute(image, request, timeout, limits, "code")
        protocol.value_of(reply, "code", limits)  # raises for a failed run
        return {
            "stdout": reply.get("stdout", ""),
            "stderr": reply.get("stderr", ""),
            "exit_code": reply.get("exit_code"),
            "duration_s": reply.get("duration_s"),
        }

    async def start(self) -> None:
        """Start now rather than on the first docker call (e.g. in a long-running service):
        connect, sweep orphans of crashed processes, fill the ``prewarm`` pools. Idempotent;
        raises SandboxError when the engine cannot be reached."""
        await asyncio.to_thread(self._ensure_started)

    async def prewarm(self, image: str, timeout: float = 60.0) -> bool:
        """Fill the pool of ``image`` and wait until it is full; True when it is."""
        api = await asyncio.to_thread(self._ensure_started)
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
        with self._start_lock:  # a start in flight finishes first; none begins after this
            pass
        self.pool.drain()
        if self.client.connected:
            try:
                api = self.client.get()
                for info in api.containers(all=True, filters={"label": f"{LABEL_BACKEND}={self.instance}"}):
                    api.remove_container(info["Id"], force=True)
            except Exception as exc:  # noqa: BLE001 - closing is best effort: the daemon may be gone
                log.debug("docker sandbox close: %s", exc)
        self.client.close()

    # --- lazy start -------------------------------------------------------------------

    def _ensure_started(self) -> Any:
        """The connected API client; the first caller also starts the backend. Blocking."""
        api = self._connect()
        if self._started:
            return api
        with self._start_lock:
            if self._closed:
                raise SandboxError("the docker sandbox backend is closed; create a new AgentSystem")
            if not self._started:
                try:
                    sweep_orphans(api)
                except Exception as exc:  # noqa: BLE001 - the sweep is housekeeping; the call goes on
                    log.debug("docker sandbox: orphan sweep failed: %s", exc)
                for image in self.settings.prewarm:
                    try:
                        self._ensure_image(api, image)
                    except SandboxError as exc:
                        log.warning("warm pool for %s not filled: %s", image, exc)
                        continue
                    self.pool.fill(image)
                self._started = True
        return api

    def _connect(self) -> Any:
        try:
            return self.client.get()
        except SandboxError:
            if not self._warned:  # once: the failing call's error carries the details and advice
                self._warned = True
                log.warning(UNREACHABLE_WARNING)
            raise

    # --- one call -------------------------------------------------------------------

    async def _execute(
        self, image: str, request: protocol.Request, timeout: float, limits: Limits, label: str, tool: str = ""
    ) -> dict[str, Any]:
        if self._closed:
            raise SandboxError("the docker sandbox backend is closed; create a new AgentSystem")
        cancelled = threading.Event()
        holder: list[SandboxContainer] = []
        try:
            exchange, state = await asyncio.to_thread(
                self._call_blocking, image, request.line, timeout, limits, tool, holder, cancelled
            )
        except asyncio.CancelledError:
            cancelled.set()
            if holder:
                await asyncio.shield(asyncio.to_thread(holder[0].destroy))
            raise
        return self._interpret(exchange, state, label, timeout, limits, request.key)

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
        api = self._ensure_started()
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
                raise SandboxError(
                    f"lost the connection to the sandbox container ({exc}); is the daemon healthy?"
                ) from exc
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
        self, ex: Exchange, state: dict[str, Any] | None, label: str, timeout: float, limits: Limits, key: bytes
    ) -> dict[str, Any]:
        """The runner's authenticated reply (to decode), or the error for a call that ended without one."""
        if ex.timed_out:
            raise ToolTimeoutError(f"{label} ran past its timeout of {timeout:g}s; its container was killed")
        if ex.overflow:
            raise ToolError(
                f"{label}: the sandbox wrote more output than allowed; its container was killed", retryable=False
            )
        if ex.eof:
            if state and state.get("OOMKilled"):
                raise ToolError(
                    f"{label}: out of memory (limit {limits.memory // 1024**2} MiB); the container was killed",
                    retryable=False,
                )
            code = state.get("ExitCode") if state else None
            tail = ex.stderr.decode("utf-8", "replace")[-1000:]
            refusal = tail.rpartition(REFUSAL)[2].strip() if REFUSAL in tail else ""
            if refusal:  # before the worker started: no tool code ran
                raise SandboxError(f"{label}: the sandbox runner refused to serve (exit code {code}): {refusal}")
            raise ToolError(
                f"{label}: the sandbox ended without a result (exit code {code}); the tool may have killed "
                f"its runner" + (f"\nstderr (tail):\n{tail}" if tail.strip() else ""),
                retryable=False,
            )
        return protocol.parse_reply(ex, label, key, limits)

    # --- containers -------------------------------------------------------------------

    def _ensure_image(self, api: Any, image: str) -> None:
        if self._images_seen.get(image):
            return
        import docker.errors

        try:
            details = api.inspect_image(image)
        except docker.errors.ImageNotFound as exc:
            raise SandboxError(f"sandbox image {image} is not present; {missing_image_advice(image)}") from exc
        except docker.errors.APIError as exc:
            raise SandboxError(f"cannot inspect sandbox image {image}: {exc}") from exc
        stale = protocol_problem(image, ((details or {}).get("Config") or {}).get("Labels"))
        if stale:
            raise SandboxError(stale)
        self._images_seen.put(image, True)

    def _launch(self, api: Any, image: str, limits: Limits, *, pooled: bool, tool: str = "") -> SandboxContainer:
        import docker.errors

        labels = container_labels(self.owner, image, pooled, tool, backend=self.instance)
        try:
            return SandboxContainer.launch(api, image, self.settings, limits, labels)
        except docker.errors.APIError as exc:
            raise SandboxError(f"cannot start a sandbox container of {image}: {exc}") from exc

    def _launch_pooled(self, image: str) -> SandboxContainer:
        """A container whose runner has started and preloaded, ready to answer at once."""
        container = self._launch(self.client.get(), image, self.settings.limits, pooled=True)
        if not container.wait_ready(READY_TIMEOUT_S):
            state = container.state(wait_s=0.1)
            tail = container.stderr_text()[-1000:].strip()
            container.destroy()
            raise SandboxError(
                f"the runner in {image} did not become ready within {READY_TIMEOUT_S:g}s (state "
                f"{state.get('Status')}, exit code {state.get('ExitCode')}); {protocol.REBUILD}"
                + (f"\nstderr (tail):\n{tail}" if tail else "")
            )
        return container
