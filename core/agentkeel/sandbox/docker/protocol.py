"""The JSON protocol between the host and the in-container runner.

The runner (``sandbox_images/python/runner.py``) documents the wire format;
this module builds requests and turns results into values or agentkeel errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentkeel.sandbox.docker.container import Exchange
from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL, Limits
from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError

# Error types that running the same call again cannot fix.
_PERMANENT = {"oom", "output_limit", "bad_output", "result_too_large", "import", "bad_request"}


def tool_request(target: str, args: Mapping[str, Any], is_async: bool, deadline_s: float, limits: Limits) -> bytes:
    return _encode(
        {"kind": "tool", "target": target, "args": dict(args), "is_async": is_async},
        deadline_s,
        limits,
    )


def code_request(code: str, deadline_s: float, limits: Limits) -> bytes:
    return _encode({"kind": "code", "code": code}, deadline_s, limits)


def _encode(body: dict[str, Any], deadline_s: float, limits: Limits) -> bytes:
    request = {
        "v": RUNNER_PROTOCOL,
        **body,
        "deadline_s": deadline_s,
        "output_limit": limits.output_limit,
        "result_limit": limits.result_limit,
    }
    try:
        return json.dumps(request, allow_nan=False, separators=(",", ":")).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ToolError(f"the tool's arguments are not JSON-serializable: {exc}", retryable=False) from exc


def max_reply_bytes(limits: Limits) -> int:
    """Upper bound of a well-formed reply: result plus both capped streams, JSON-escaped."""
    return limits.result_limit + 12 * limits.output_limit + 64 * 1024


def parse_reply(ex: Exchange, label: str) -> dict[str, Any]:
    """The runner's result object from an exchange that ended with a full line.

    Raises ``SandboxError`` when the runner wrote something that is not its result.
    """
    line = ex.stdout.split(b"\n", 1)[0]
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SandboxError(
            f"{label}: the sandbox runner wrote an unreadable result ({exc}); is the image built from "
            f"sandbox_images/python? Rebuild it with `agentkeel sandbox build`"
        ) from exc
    if not isinstance(reply, dict) or "ok" not in reply:
        raise SandboxError(f"{label}: the sandbox runner's reply is not a result object; rebuild the image")
    return reply


def raise_for_reply(reply: Mapping[str, Any], label: str, limits: Limits) -> None:
    """Raise the agentkeel error that matches a failed runner reply."""
    error = reply.get("error") or {}
    kind = str(error.get("type", "unknown"))
    message = str(error.get("message", "no message"))
    stderr_tail = str(reply.get("stderr", ""))[-2000:]
    detail = f"{label}: {message}"
    if kind == "exception" and error.get("traceback"):
        detail += "\n" + str(error["traceback"])[-4000:]
    elif stderr_tail.strip():
        detail += f"\nstderr (tail):\n{stderr_tail}"
    if kind == "timeout":
        raise ToolTimeoutError(detail)
    if kind == "oom":
        raise ToolError(f"{label}: out of memory (limit {limits.memory // 1024**2} MiB): {message}", retryable=False)
    if kind in ("internal", "bad_request", "import"):
        raise SandboxError(detail)
    raise ToolError(detail, retryable=kind not in _PERMANENT)
