"""The JSON trust-boundary checks: every violation is refused with a message naming the field."""

from __future__ import annotations

import math
from typing import Any

import pytest
from agentkeel import jsonvalue


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"amount": math.nan}, "argument amount: NaN is not a JSON number"),
        ({"a": [1, math.inf]}, "argument a.1: Infinity is not a JSON number"),
        ({"a": {"b": -math.inf}}, "argument a.b: -Infinity is not a JSON number"),
        ({"ids": {1, 2}}, "argument ids: a set is not a JSON value"),
        ({1: "x"}, "argument: object key 1 is not a string"),
        ({"to\udc80": "x"}, "argument: an object key contains a lone surrogate"),
        ({"to": "x\ud800"}, "argument to: contains a lone surrogate (U+D800)"),
        (nested(65), "nested more than 64 levels deep"),
        (object(), "argument: a object is not a JSON value"),
    ],
)
def test_values_that_are_not_json_are_refused_naming_the_field(value: Any, message: str) -> None:
    assert jsonvalue.problem(value) is not None
    with pytest.raises(jsonvalue.JSONValueError) as caught:
        jsonvalue.check(value, what="argument")
    assert message in str(caught.value)


@pytest.mark.parametrize("value", [None, True, 0, 1.5, "text", "é", [], {}, {"a": [1, {"b": None}]}, nested(64),
                                   (1, 2)])
def test_json_values_pass(value: Any) -> None:
    assert jsonvalue.problem(value) is None
    jsonvalue.check(value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "reply: nested more than 64 levels deep"),
        ("[" * 3000 + "]" * 3000, "reply: nested more than 64 levels deep"),
        ('{"a": NaN}', "reply a: NaN is not a JSON number"),
        ('{"a": -Infinity}', "reply a: -Infinity is not a JSON number"),
        ('{"a": "\\ud800"}', "reply a: contains a lone surrogate"),
        ("{", "reply: not JSON"),
        (b"\xff", "reply: not UTF-8 text"),
    ],
)
def test_untrusted_text_is_decoded_with_limits(text: str | bytes, message: str) -> None:
    with pytest.raises(jsonvalue.JSONValueError) as caught:
        jsonvalue.loads(text, what="reply")
    assert message in str(caught.value)


def test_size_limit() -> None:
    with pytest.raises(jsonvalue.JSONValueError, match="more than the limit of 10"):
        jsonvalue.loads('"' + "x" * 20 + '"', what="reply", max_bytes=10)
    assert jsonvalue.loads('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
