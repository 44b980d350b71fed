"""The JSON protocol between the host and the in-container runner.

The runner (``sandbox_images/python/runner.py``) documents the wire format: a
request line in, a reply line out. Each request carries a fresh random key
(``secrets.token_bytes``) that only this call's runner learns; the runner takes
it out of the request before the tool's process sees the request, and its reply
line is ``<hex HMAC-SHA256> <JSON>``. A reply whose MAC is missing or wrong was
not written by the runner (code in the container forging the host's channel)
and is refused with a ``SandboxError``. The JSON is a result envelope
(``agentkeel.sandbox.envelope``, the same one the subprocess sandbox uses) plus
what the runner observed; it is decoded with ``agentkeel.jsonvalue`` (bounded
size and depth, no NaN) before anything looks at it. This module builds
requests and turns replies into values or agentkeel errors.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Mapping
from typing import Any

import attrs

import agentkeel.jsonvalue as jsonvalue
from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.sandbox import envelope
from agentkeel.sandbox.docker.container import Exchange
from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL, Limits

REBUILD = "rebuild the images with `agentkeel sandbox build`"
KEY_BYTES = 32
# The envelope wraps the tool's value in one object: the value itself gets jsonvalue's full depth.
REPLY_MAX_DEPTH = jsonvalue.MAX_DEPTH + 1
_MAC = re.compile(rb"[0-9a-f]{64}")
# Failures that mean the image, not the call, is wrong.
_SANDBOX_KINDS = {envelope.INTERNAL, envelope.BAD_REQUEST, envelope.IMPORT}


@attrs.frozen
class Request:
    """One request line for the runner and the key its reply must be authenticated with."""

    line: bytes = attrs.field(repr=False)
    key: bytes = attrs.field(repr=False)


def tool_request(target: str, args: Mapping[str, Any], is_async: bool, deadline_s: float, limits: Limits) -> Request:
    return _encode(
        {"kind": "tool", "target": target, "args": dict(args), "is_async": is_async},
        deadline_s,
        limits,
    )


def code_request(code: str, deadline_s: float, limits: Limits) -> Request:
    return _encode({"kind": "code", "code": code}, deadline_s, limits)


def _encode(body: dict[str, Any], deadline_s: float, limits: Limits) -> Request:
    key = secrets.token_bytes(KEY_BYTES)
    request = {
        "v": RUNNER_PROTOCOL,
        **body,
        "deadline_s": deadline_s,
        "output_limit": limits.output_limit,
        "result_limit": limits.result_limit,
        "key": key.hex(),
    }
    try:
        line = json.dumps(request, allow_nan=False, separators=(",", ":")).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise ToolError(f"the tool's arguments are not JSON-serializable: {exc}", retryable=False) from exc
    return Request(line, key)


def reply_mac(key: bytes, body: bytes) -> bytes:
    """The MAC the runner puts before ``body``: lowercase hex HMAC-SHA256."""
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def max_reply_bytes(limits: Limits) -> int:
    """Upper bound of a well-formed reply: result (or failure envelope) plus both capped streams,
    JSON-escaped."""
    return limits.result_limit + 12 * limits.output_limit + 256 * 1024


def parse_reply(ex: Exchange, label: str, key: bytes, limits: Limits) -> dict[str, Any]:
    """The runner's authenticated reply object from an exchange that ended with a full line.

    Raises ``SandboxError`` when the line is not authenticated with ``key`` (a
    possible forgery) or the runner speaks another protocol version (an image
    built by another agentkeel), and ``ToolError`` (not retryable) when the
    authenticated reply carries JSON the host does not accept (too deep, too
    large, NaN...): the tool's value is what the runner read from the tool.
    """
    line = ex.stdout.split(b"\n", 1)[0]
    mac, sep, body = line.partition(b" ")
    if not sep or _MAC.fullmatch(mac) is None:
        raise _unauthenticated(line, label)
    if not hmac.compare_digest(reply_mac(key, body), mac):
        raise SandboxError(
            f"{label}: the sandbox reply failed authentication (wrong MAC): it was not written by the runner "
            f"and may be forged by code in the container; the reply was refused"
        )
    try:
        reply = jsonvalue.loads(body, what=f"{label}: the sandbox reply", max_bytes=max_reply_bytes(limits),
                                max_depth=REPLY_MAX_DEPTH)
    except jsonvalue.JSONValueError as exc:
        raise ToolError(str(exc), retryable=False) from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise SandboxError(f"{label}: the sandbox runner's reply is not a result object; {REBUILD}")
    if reply.get("v") != RUNNER_PROTOCOL:
        raise SandboxError(
            f"{label}: the image's runner speaks protocol {reply.get('v')!r}, this agentkeel speaks "
            f"{RUNNER_PROTOCOL}; {REBUILD}"
        )
    return reply


def _unauthenticated(line: bytes, label: str) -> SandboxError:
    """The error for a reply line without a MAC: a runner of another protocol (say so), or a forgery."""
    try:
        bare = jsonvalue.loads(line, what="reply", max_bytes=256 * 1024)
    except jsonvalue.JSONValueError:
        bare = None
    version = bare.get("v") if isinstance(bare, dict) else None
    if version is not None and version != RUNNER_PROTOCOL:
        return SandboxError(
            f"{label}: the image's runner speaks protocol {version!r}, this agentkeel speaks {RUNNER_PROTOCOL} "
            f"(its reply carries no MAC and was refused); {REBUILD}"
        )
    return SandboxError(
        f"{label}: the sandbox reply carries no MAC: it was not written by the runner and may be forged by "
        f"code in the container; the reply was refused"
    )


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
