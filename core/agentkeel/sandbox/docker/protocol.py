"""The JSON protocol between the host and the in-container runner.

The runner (``sandbox_images/python/runner.py``) documents the wire format: a
request line in, a reply line out. The reply is a result envelope
(``agentkeel.sandbox.envelope``, the same one the subprocess sandbox uses) plus
what the runner observed; this module builds requests and turns replies into
values or agentkeel errors.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.sandbox import envelope
from agentkeel.sandbox.docker.container import Exchange
from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL, Limits

REBUILD = "rebuild the images with `agentkeel sandbox build`"
# Failures that mean the image, not the call, is wrong.
_SANDBOX_KINDS = {envelope.INTERNAL, envelope.BAD_REQUEST, envelope.IMPORT}


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
    """Upper bound of a well-formed reply: result (or failure envelope) plus both capped streams,
    JSON-escaped."""
    return limits.result_limit + 12 * limits.output_limit + 256 * 1024


def parse_reply(ex: Exchange, label: str) -> dict[str, Any]:
    """The runner's reply object from an exchange that ended with a full line.

    Raises ``SandboxError`` when the runner wrote something that is not its reply,
    or speaks another protocol version (an image built by another agentkeel).
    """
    line = ex.stdout.split(b"\n", 1)[0]
    try:
        reply = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SandboxError(
            f"{label}: the sandbox runner wrote an unreadable result ({exc}); is the image built from "
            f"sandbox_images/python? {REBUILD}"
        ) from exc
    if not isinstance(reply, dict) or "ok" not in reply:
        raise SandboxError(f"{label}: the sandbox runner's reply is not a result object; {REBUILD}")
    if reply.get("v") != RUNNER_PROTOCOL:
        raise SandboxError(
            f"{label}: the image's runner speaks protocol {reply.get('v')!r}, this agentkeel speaks "
            f"{RUNNER_PROTOCOL}; {REBUILD}"
        )
    return reply


def value_of(reply: Mapping[str, Any], label: str, limits: Limits) -> Any:
    """The tool's value in a runner reply, or the agentkeel error its failure maps to."""
    try:
        outcome = envelope.decode(reply)
    except envelope.MalformedEnvelopeError as exc:
        raise SandboxError(f"{label}: the sandbox runner's reply is not a result envelope ({exc}); {REBUILD}") from exc
    if isinstance(outcome, envelope.Success):
        return outcome.value
    raise error_for(outcome, label, limits, str(reply.get("stderr", "")))


def error_for(failure: envelope.Failure, label: str, limits: Limits, stderr: str = "") -> Exception:
    """The agentkeel error for a failure the runner reported (``retryable`` as the envelope says)."""
    tail = stderr[-2000:]
    detail = failure.describe(label, traceback_limit=4000)
    if not failure.traceback.strip() and tail.strip():
        detail += f"\nstderr (tail):\n{tail}"
    if failure.kind == envelope.TIMEOUT:
        return ToolTimeoutError(detail, stderr_tail=tail)
    if failure.kind == envelope.OUT_OF_MEMORY:
        return ToolError(f"{label}: out of memory (limit {limits.memory // 1024**2} MiB): {failure.message}",
                         retryable=False, stderr_tail=tail)
    if failure.kind in _SANDBOX_KINDS:
        return SandboxError(detail)
    return ToolError(detail, retryable=failure.retryable, stderr_tail=tail)
