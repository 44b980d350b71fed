from __future__ import annotations

import pytest
from agentkeel.errors import PlanRejectedError
from agentkeel.planner.plan import (
    PlanTemplate,
    RefError,
    evaluate_condition,
    parse_plan,
    resolve_args,
    wire_errors,
)


def wire(*steps: dict) -> dict:
    return {"reasoning": "r", "steps": list(steps)}


def test_parse_numbers_steps_and_collects_dependencies() -> None:
    plan = parse_plan(
        wire(
            {"description": "a", "tool_name": "lookup", "tool_args": {"id": "1"}},
            {
                "description": "b",
                "tool_name": "refund",
                "tool_args": {"amount": {"$ref": "/1/total"}},
                "when": {"ref": "/1/status", "op": "eq", "value": "shipped"},
            },
        )
    )
    assert [s.step_id for s in plan.steps] == [1, 2]
    assert plan.steps[0].depends_on == frozenset()
    assert plan.steps[1].depends_on == frozenset({1})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"steps": []}, "'reasoning' is a required property"),
        (wire({"description": "a", "tool_args": {}}), "steps[0] (step 1): 'tool_name' is a required property"),
        (wire({"description": "a", "tool_name": "t", "tool_args": "x"}), "steps[0]['tool_args'] (step 1)"),
        ("not an object", "is not of type 'object'"),
    ],
)
def test_wire_errors_name_the_field(data: object, fragment: str) -> None:
    errors = wire_errors(data)
    assert any(fragment in e for e in errors), errors
    with pytest.raises(PlanRejectedError):
        parse_plan(data)


def test_conditions_are_data_not_code() -> None:
    results = {1: {"status": "shipped", "total": 20.0, "items": [1, 2]}}
    assert evaluate_condition({"ref": "/1/status", "op": "eq", "value": "shipped"}, results)
    assert not evaluate_condition({"ref": "/1/status", "op": "in", "value": ["pending"]}, results)
    assert evaluate_condition({"all": [{"ref": "/1/total", "op": "gt", "value": 10},
                                       {"not": {"ref": "/1/refund", "op": "exists"}}]}, results)
    assert evaluate_condition({"any": [{"ref": "/1/items/1", "op": "eq", "value": 2}]}, results)
    with pytest.raises(RefError, match="no 'missing'"):
        evaluate_condition({"ref": "/1/missing", "op": "eq", "value": 1}, results)
    bad = wire({"description": "a", "tool_name": "t", "tool_args": {},
                "when": {"ref": "/1/x", "op": "__import__('os')"}})
    assert wire_errors(bad)


def test_resolve_args_replaces_references_deeply() -> None:
    results = {1: {"total": 5, "email": "a@b"}}
    args = {"amount": {"$ref": "/1/total"}, "to": [{"$ref": "/1/email"}], "keep": {"x": 1}}
    assert resolve_args(args, results) == {"amount": 5, "to": ["a@b"], "keep": {"x": 1}}
    with pytest.raises(RefError, match="step 2 has no result"):
        resolve_args({"a": {"$ref": "/2"}}, results)


def test_template_fills_placeholders_and_requires_full_match() -> None:
    template = PlanTemplate(
        pattern=r"refund order (?P<order_id>\w+)",
        steps=[{"description": "look up {order_id}", "tool_name": "lookup", "tool_args": {"id": "{order_id}"}}],
        name="t",
    )
    data = template.match("  Refund order 1001 ")
    assert data is not None
    assert data["steps"][0]["tool_args"] == {"id": "1001"}
    assert data["steps"][0]["description"] == "look up 1001"
    assert template.match("please refund order 1001 now") is None
