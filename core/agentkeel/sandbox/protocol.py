"""The execution sandbox protocol that every isolation backend implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from agentkeel.types import ToolSpec


@attrs.frozen
class ToolCall:
    """One call attempt for a backend to run: the tool, its final arguments and its deadline.

    ``kind`` is "forward" for a plan step and "compensation" for the call that
    undoes one; ``attempt`` counts from 1 for each step and kind.
    """

    spec: ToolSpec
    args: Mapping[str, Any]
    timeout: float
    run_id: str = ""
    step_id: int = 0
    kind: str = "forward"
    attempt: int = 1


@runtime_checkable
class SandboxBackend(Protocol):
    """Runs tool calls with some isolation.

    ``strength`` ranks the isolation (the built-ins: inprocess 0, subprocess 10,
    docker 20): configuration may move a tool to a backend at least as strong
    as the one it declares, never to a weaker one.

    ``run`` returns the tool's result (JSON-compatible for out-of-process
    backends) or raises ``ToolError`` (``ToolTimeoutError`` past the deadline)
    for failures of the call, ``SandboxError`` when the backend itself cannot
    run it. Cancelling the awaiting task must stop the call. ``aclose`` releases
    what the backend holds; the host calls it once when the system closes.
    """

    strength: int

    async def run(self, call: ToolCall) -> Any: ...

    async def aclose(self) -> None: ...
