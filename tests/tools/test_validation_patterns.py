"""JSON Schema patterns are ECMA-262, on the compiled fast path and on jsonschema's, alike."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from agentkeel import patterns
from agentkeel.tools.validation import CompiledSchema, schema_errors
from hypothesis import given
from hypothesis import strategies as st

EMAIL = r"^[a-z]+@example\.com$"


def fast(schema: dict[str, Any]) -> CompiledSchema:
    compiled = CompiledSchema(schema)
    assert compiled.fast, "the compiled check should be used for this schema"
    return compiled


def slow(schema: dict[str, Any]) -> CompiledSchema:
    compiled = CompiledSchema(schema)
    assert not compiled.fast
    return compiled


def args(pattern: str) -> dict[str, Any]:
    return {"type": "object", "properties": {"to": {"type": "string", "pattern": pattern}}}


def test_dollar_does_not_match_before_a_trailing_newline_on_the_fast_path() -> None:
    compiled = fast(args(EMAIL))
    assert compiled.is_valid({"to": "bob@example.com"})
    assert not compiled.is_valid({"to": "bob@example.com\n"})
    assert compiled.errors({"to": "bob@example.com\n"}) == [
        f"argument to: 'bob@example.com\\n' does not match {EMAIL!r}"
    ]


def test_dollar_does_not_match_before_a_trailing_newline_on_the_jsonschema_path() -> None:
    schema = {**args(EMAIL), "dependentRequired": {"to": []}}  # not portable: jsonschema alone
    compiled = slow(schema)
    assert compiled.is_valid({"to": "bob@example.com"})
    assert not compiled.is_valid({"to": "bob@example.com\n"})
    assert not compiled.is_valid({"to": "\nbob@example.com"})


def test_classes_are_ecma_262_ascii_unless_unicode_is_asked_for() -> None:
    digits = fast(args(r"^\d+$"))
    assert digits.is_valid({"to": "123"}) and not digits.is_valid({"to": "١٢٣"})
    words = fast(args(r"^\w+$"))
    assert not words.is_valid({"to": "héllo"})
    # \p{...} is ECMA-262 (u flag) but not Python re: fastjsonschema cannot compile it, jsonschema evaluates it
    letters = slow(args(r"^\p{L}+$"))
    assert letters.is_valid({"to": "héllo"}) and not letters.is_valid({"to": "h3llo"})
    named = slow(args(r"^(?<user>[a-z]+)@\k<user>\.com$"))
    assert named.is_valid({"to": "bob@bob.com"}) and not named.is_valid({"to": "bob@eve.com"})


def test_every_keyword_that_evaluates_a_pattern_uses_ecma_262() -> None:
    keyed = {"patternProperties": {"^a$": {"type": "integer"}}, "additionalProperties": False}
    assert CompiledSchema(keyed).is_valid({"a": 1})
    assert not CompiledSchema(keyed).is_valid({"a\n": 1})
    assert not CompiledSchema({"patternProperties": {"^a$": {"type": "integer"}}}).is_valid({"a": "x"})
    assert CompiledSchema({"patternProperties": {"^a$": {"type": "integer"}}}).is_valid({"a\n": "x"})
    unevaluated = {"allOf": [{"patternProperties": {"^a$": {}}}], "unevaluatedProperties": False}
    assert CompiledSchema(unevaluated).is_valid({"a": 1})
    assert not CompiledSchema(unevaluated).is_valid({"a\n": 1})
    assert not CompiledSchema({"propertyNames": {"pattern": "^a$"}}).is_valid({"a\n": 1})
    # jsonschema on its own (Python re) gets each of these wrong: this is what the module is for
    assert jsonschema.Draft202012Validator(unevaluated).is_valid({"a\n": 1})


def test_a_subschema_that_names_its_own_dialect_keeps_ecma_262_patterns() -> None:
    schema = {"properties": {"to": {"$schema": "https://json-schema.org/draft/2020-12/schema", "pattern": "^a$"}}}
    assert not CompiledSchema(schema).is_valid({"to": "a\n"})
    assert jsonschema.Draft202012Validator(schema).is_valid({"to": "a\n"})


def test_patterns_reached_through_references_are_ecma_262() -> None:
    schema = {
        "$defs": {"e": {"type": "string", "pattern": "^a$"}, "p": {"patternProperties": {"^k$": {}}}},
        "properties": {"x": {"$ref": "#/$defs/e"}},
        "$ref": "#/$defs/p",
        "unevaluatedProperties": False,
    }
    compiled = slow(schema)
    assert compiled.is_valid({"x": "a", "k": 1})
    assert not compiled.is_valid({"x": "a\n"})
    assert not compiled.is_valid({"k\n": 1})


@pytest.mark.parametrize("pattern", [r"(?P<user>[a-z]+)", r"(?i)^bob$", r"^bob\Z", r"^\-$", r"[a-z"])
def test_a_pattern_that_is_not_ecma_262_fails_every_value_naming_the_field(pattern: str) -> None:
    compiled = CompiledSchema(args(pattern))
    assert not compiled.is_valid({"to": "bob"})
    [error] = compiled.errors({"to": "bob"})
    assert error.startswith("arguments: the schema is invalid: properties.to.pattern: ")
    assert "is not an ECMA-262 regular expression" in error
    assert schema_errors(args(pattern), {"to": "bob"}) == [error]
    with pytest.raises(jsonschema.SchemaError, match=r"^properties\.to\.pattern: .* not an ECMA-262"):
        patterns.check_schema(args(pattern))


def test_check_schema_still_checks_the_rest_of_the_metaschema() -> None:
    patterns.check_schema(args(EMAIL))
    with pytest.raises(jsonschema.SchemaError, match=r"properties\.to\.type"):
        patterns.check_schema({"properties": {"to": {"type": "text"}}})
    with pytest.raises(jsonschema.SchemaError, match=r"patternProperties: .* not an ECMA-262"):
        patterns.check_schema({"patternProperties": {"(?i)x": {}}})
    assert patterns.pattern_problems({"properties": {"pattern": {"type": "string"}}}) == []
    assert patterns.pattern_problems({"properties": {"to": {"pattern": 5}}}) == [
        "properties.to.pattern: 5 is not of type 'string'"
    ]


SAMPLES = [EMAIL, r"^[0-9]{3}-[0-9]{4}$", r"^a.c$", r"x$", r"^\s*$", r"^[^\n]*$", r"^(foo|bar)+$"]


@given(st.sampled_from(SAMPLES), st.text(alphabet="abcxfor09-@.\n\r \t\u2028é", max_size=12))
def test_the_fast_path_and_jsonschema_agree_with_the_ecma_engine(pattern: str, text: str) -> None:
    expected = patterns.search(pattern, text)
    assert fast(args(pattern)).is_valid({"to": text}) is expected
    assert patterns.Validator(args(pattern)).is_valid({"to": text}) is expected


def test_a_tool_schema_with_a_pattern_that_is_not_ecma_262_is_refused_at_registration() -> None:
    from agentkeel import tool
    from agentkeel.errors import ToolSpecError
    from agentkeel.tools.registry import ToolRegistry

    @tool(idempotent=True, args_schema={"type": "object", "properties": {"x": {"type": "string",
                                                                              "pattern": "(?P<n>a)"}}})
    def named(x: str) -> str:
        return x

    with pytest.raises(ToolSpecError, match=r"invalid args_schema: .*pattern.*ECMA-262"):
        ToolRegistry().add(named.__agentkeel_tool__, "p")  # type: ignore[attr-defined]
