"""The execution sandbox protocol that every isolation backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from agentkeel.types import ToolSpec


@attrs.frozen
class ToolCall:
    """One call for a backend to run: the tool, its final arguments and its deadline."""

    spec: ToolSpec
    args: Mapping[str, Any]
    timeout: float
    run_id: str = ""
    step_id: int = 0


@runtime_checkable
class SandboxBackend(Protocol):
    """Runs tool calls with some isolation.

    ``run`` returns the tool's result (JSON-compatible for out-of-process
    backends) or raises ``ToolError`` (``ToolTimeoutError`` past the deadline)
    for failures of the call, ``SandboxError`` when the backend itself cannot
    run it. Cancelling the awaiting task must stop the call.
    """

    async def run(self, call: ToolCall) -> Any: ...

    async def aclose(self) -> None: ...
