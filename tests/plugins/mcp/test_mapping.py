"""The pure mappings: MCP hints to retry-safety, MCP results to step results (no server)."""

from __future__ import annotations

import base64

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

import mcp.types as types
from agentkeel.jsonvalue import check
from agentkeel_mcp.metadata import idempotent_from_hints
from agentkeel_mcp.results import error_text, to_step_result


@pytest.mark.parametrize(("hints", "idempotent", "origin"), [
    (None, False, "no readOnlyHint or idempotentHint"),
    (types.ToolAnnotations(), False, "no readOnlyHint or idempotentHint"),
    (types.ToolAnnotations(read_only_hint=True), True, "readOnlyHint"),
    (types.ToolAnnotations(read_only_hint=True, destructive_hint=True), True, "readOnlyHint"),
    (types.ToolAnnotations(destructive_hint=True), False, "destructiveHint"),
    (types.ToolAnnotations(destructive_hint=True, idempotent_hint=True), False, "destructiveHint"),
    (types.ToolAnnotations(destructive_hint=False, idempotent_hint=True), True, "idempotentHint"),
    (types.ToolAnnotations(idempotent_hint=True), False, "idempotentHint ignored"),
    (types.ToolAnnotations(read_only_hint=False, destructive_hint=False), False, "no readOnlyHint"),
])
def test_hints_to_idempotent(hints: types.ToolAnnotations | None, idempotent: bool, origin: str) -> None:
    got, why = idempotent_from_hints(hints)
    assert got is idempotent
    assert why.startswith(origin)


def result(*content: types.ContentBlock, structured: object = None, error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=list(content), structured_content=structured, is_error=error)


def text(value: str) -> types.TextContent:
    return types.TextContent(type="text", text=value)


@pytest.mark.parametrize(("call", "expected"), [
    (result(text('{"a": 1}'), structured={"a": 1, "b": [2]}), {"a": 1, "b": [2]}),
    (result(text('{"x": [1, 2.5, null]}')), {"x": [1, 2.5, None]}),
    (result(text("42")), 42),
    (result(text("hello world")), {"text": "hello world"}),
    (result(text("NaN")), {"text": "NaN"}),
    (result(text('{"big": 1e999}')), {"text": '{"big": 1e999}'}),
    (result(text("")), {"text": ""}),
    (result(), None),
    (result(text("a"), text("b")), {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
])
def test_results_become_json_values(call: types.CallToolResult, expected: object) -> None:
    value = to_step_result(call)
    assert value == expected
    check(value, what="the result")


def test_binary_content_is_described_not_copied() -> None:
    blob = base64.b64encode(b"\x00" * 1000).decode()
    value = to_step_result(result(
        types.ImageContent(type="image", data=blob, mime_type="image/png"),
        types.AudioContent(type="audio", data=blob, mime_type="audio/wav"),
        types.ResourceLink(type="resource_link", uri="file:///a.txt", name="a.txt", mime_type="text/plain", size=5),
        types.EmbeddedResource(type="resource", resource=types.TextResourceContents(
            uri="mem://note", mime_type="text/markdown", text="# note")),
        types.EmbeddedResource(type="resource", resource=types.BlobResourceContents(
            uri="mem://blob", mime_type="application/octet-stream", blob=blob)),
    ))
    assert value == {"content": [
        {"type": "image", "mime_type": "image/png", "size_bytes": 1000},
        {"type": "audio", "mime_type": "audio/wav", "size_bytes": 1000},
        {"type": "resource_link", "uri": "file:///a.txt", "name": "a.txt", "mime_type": "text/plain",
         "size_bytes": 5},
        {"type": "resource", "uri": "mem://note", "mime_type": "text/markdown", "text": "# note"},
        {"type": "resource", "uri": "mem://blob", "mime_type": "application/octet-stream", "size_bytes": 1000},
    ]}
    assert blob not in str(value)


def test_error_text() -> None:
    assert error_text(result(text("no such file"), error=True)) == "no such file"
    assert error_text(result(error=True)) == "the tool reported an error without a message"
    long = error_text(result(text("x" * 5000), error=True))
    assert len(long) < 2100 and long.endswith("(3000 more characters)")
