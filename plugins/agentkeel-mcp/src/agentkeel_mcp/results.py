"""An MCP ``CallToolResult`` as an agentkeel step result (always a JSON value).

In order:

1. ``structuredContent`` when the server sent it: that value, as is (it is what
   the tool's ``outputSchema``, the step's ``output_schema``, describes).
2. a single text block whose text is JSON: the parsed value.
3. a single text block: ``{"text": "..."}`` (an object, so plans and answer
   templates reach it as ``/N/text`` and ``{N.text}`` like any other field).
4. no content: ``None``.
5. anything else (several blocks, images, audio, resources):
   ``{"content": [...]}``, each block described as JSON: text blocks keep their
   text, an embedded text resource its text; binary data (images, audio, blobs)
   is never copied into the journal, only described by its MIME type and size.

An ``isError`` result is not a result: ``error_text`` gives the message the
tool proxy raises as a ``ToolError``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import mcp.types as types

MAX_ERROR_CHARS = 2000


def to_step_result(result: types.CallToolResult) -> Any:
    """The JSON value a successful call result stands for (see the module doc)."""
    if result.structured_content is not None:
        return result.structured_content
    content = result.content
    if not content:
        return None
    if len(content) == 1 and isinstance(content[0], types.TextContent):
        text = content[0].text
        parsed = _json(text)
        return {"text": text} if parsed is _NOT_JSON else parsed
    return {"content": [describe(block) for block in content]}


def error_text(result: types.CallToolResult) -> str:
    """What an ``isError`` result says (its text blocks), bounded in length."""
    texts = [block.text for block in result.content if isinstance(block, types.TextContent) and block.text]
    text = "; ".join(texts) if texts else "the tool reported an error without a message"
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"... ({len(text) - MAX_ERROR_CHARS} more characters)"
    return text


def describe(block: types.ContentBlock) -> dict[str, Any]:
    """One content block as JSON; binary payloads are described, never copied."""
    if isinstance(block, types.TextContent):
        return {"type": "text", "text": block.text}
    if isinstance(block, types.ImageContent | types.AudioContent):
        return {"type": block.type, "mime_type": block.mime_type, "size_bytes": _decoded_size(block.data)}
    if isinstance(block, types.ResourceLink):
        link: dict[str, Any] = {"type": "resource_link", "uri": block.uri, "name": block.name}
        if block.mime_type is not None:
            link["mime_type"] = block.mime_type
        if block.size is not None:
            link["size_bytes"] = block.size
        return link
    resource = block.resource
    described: dict[str, Any] = {"type": "resource", "uri": resource.uri}
    if resource.mime_type is not None:
        described["mime_type"] = resource.mime_type
    if isinstance(resource, types.TextResourceContents):
        described["text"] = resource.text
    else:
        described["size_bytes"] = _decoded_size(resource.blob)
    return described


def _decoded_size(data: str) -> int:
    """The size in bytes of base64 ``data`` (its length as sent when it is not valid base64)."""
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return len(data)


_NOT_JSON = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text} is out of range")
    return value


def _json(text: str) -> Any:
    """The JSON value ``text`` holds, or ``_NOT_JSON`` (NaN and Infinity are not JSON)."""
    stripped = text.strip()
    if not stripped:
        return _NOT_JSON
    try:
        return json.loads(stripped, parse_constant=_reject_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return _NOT_JSON
