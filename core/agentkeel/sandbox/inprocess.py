"""The in-process sandbox: async tools on the event loop, sync tools on a worker thread.

The timeout stops waiting for the call; it cannot stop a sync tool's thread, so
tools that must be stopped for certain belong in "subprocess" or "docker".
"""

from __future__ import annotations

import asyncio
from typing import Any

from agentkeel.config import Config
from agentkeel.errors import ToolError, ToolTimeoutError
from agentkeel.markers import hookimpl
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall


class InProcessBackend:
    """Runs tools on the host's event loop (async) or a worker thread (sync)."""

    strength = 0

    async def run(self, call: ToolCall) -> Any:
        spec = call.spec
        deadline = asyncio.timeout(call.timeout)
        try:
            async with deadline:
                if spec.is_async:
                    return await spec.fn(**call.args)
                return await asyncio.to_thread(spec.fn, **call.args)
        except TimeoutError as exc:
            if deadline.expired():
                raise ToolTimeoutError(f"{spec.name} timed out after {call.timeout:g}s") from None
            raise ToolError(f"TimeoutError: {exc}") from exc
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        return None


@hookimpl
def agentkeel_register_sandboxes(register: Any, config: Config) -> None:
    backend: SandboxBackend = InProcessBackend()
    register("inprocess", backend)
