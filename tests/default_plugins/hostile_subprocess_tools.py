"""Subprocess tools that answer the host with values it must refuse cleanly.

They run in the subprocess sandbox's child (``agentkeel.sandbox.subprocess.child``);
the ``writes_*`` ones bypass the envelope and write onto the result channel
themselves, as hostile code in the child can.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from agentkeel import tool

HOSTILE: dict[str, Any] = {"isolation": "subprocess", "idempotent": True, "permissions": ["sandbox-test"]}


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _result_fd() -> int:
    """The child's result channel: ``result_fd`` in the frame of its ``main``."""
    frame = sys._getframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("result_fd"), int):
            return int(frame.f_locals["result_fd"])
        frame = frame.f_back  # type: ignore[assignment]
    raise RuntimeError("no result channel found")


def _write_and_exit(data: bytes) -> None:
    os.write(_result_fd(), data)
    os._exit(0)


@tool(**HOSTILE)
def returns_nan() -> dict[str, Any]:
    """Return a NaN through the envelope (which refuses it)."""
    return {"ok": 0.5, "score": float("nan")}


@tool(**HOSTILE)
def returns_floats() -> dict[str, Any]:
    """Floats are fine."""
    return {"score": 0.25, "big": 1e300}


@tool(**HOSTILE)
def returns_deep(depth: int = 100_000) -> Any:
    """Return a list nested ``depth`` levels deep (the envelope refuses it)."""
    return _deep(depth)


@tool(**HOSTILE)
def writes_nan() -> None:
    """Write an envelope whose value holds a NaN straight onto the result channel."""
    _write_and_exit(b'{"ok":true,"value":{"score":NaN}}')


@tool(**HOSTILE)
def writes_deep(depth: int = 100_000) -> None:
    """Write an envelope nested ``depth`` levels deep straight onto the result channel."""
    _write_and_exit(b'{"ok":true,"value":' + b"[" * depth + b"]" * depth + b"}")


@tool(**HOSTILE)
def writes_deep_failure(depth: int = 100_000) -> None:
    """A failure envelope whose message is an array nested ``depth`` levels deep."""
    _write_and_exit(b'{"ok":false,"error":{"kind":"exception","message":' + b"[" * depth + b"]" * depth + b"}}")
