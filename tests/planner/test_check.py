"""The host's plan check: limits that hold whichever planner produced the plan."""

from __future__ import annotations

import math
from typing import Any

import pytest
from agentkeel import AgentRequest, Config, ConfigError, PlanTemplate, RunStatus, hookimpl, tool
from agentkeel.config import DEFAULT_MAX_STEPS
from agentkeel.planner.check import plan_problems
from agentkeel.planner.plan import parse_plan
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.tools.decorator import spec_of
from agentkeel.types import Plan, PlanStep, ToolSpec


@tool(permissions=["shop"])
async def refund(order_id: str, amount: float) -> dict[str, Any]:
    """Refund an order."""
    return {"order_id": order_id, "amount": amount}


REFUND = spec_of(refund)
assert REFUND is not None
TOOLS: dict[str, ToolSpec] = {"refund": REFUND}
STEP = {"description": "refund", "tool_name": "refund", "tool_args": {"order_id": "A1", "amount": 1.0}}


def wire(count: int) -> dict[str, Any]:
    return {"reasoning": "r", "steps": [STEP] * count}


# --- max_steps -------------------------------------------------------------------------


@pytest.mark.parametrize("planner", ["rules:bulk", "llm:fast", "my-plugin"])
def test_a_plan_of_51_steps_is_rejected_with_the_default_config(planner: str) -> None:
    assert Config.from_dict({}, "<t>").max_steps == DEFAULT_MAX_STEPS == 50
    problems = plan_problems(parse_plan(wire(51), planner=planner), TOOLS)
    assert problems == [
        f"the plan has 51 steps, more than the 50 allowed ([planner] max_steps in agentkeel.toml); "
        f"planner {planner!r} must plan fewer steps"
    ]
    assert plan_problems(parse_plan(wire(50), planner=planner), TOOLS) == []


def test_max_steps_from_the_config_is_the_limit() -> None:
    config = Config.from_dict({"planner": {"max_steps": 3}}, "<t>")
    assert config.max_steps == 3
    assert plan_problems(parse_plan(wire(3)), TOOLS, max_steps=config.max_steps) == []
    [problem] = plan_problems(parse_plan(wire(4)), TOOLS, max_steps=config.max_steps)
    assert "the plan has 4 steps, more than the 3 allowed" in problem


def test_a_huge_plan_is_refused_without_checking_every_step() -> None:
    steps = tuple(PlanStep(step_id=i, tool_name="nope", tool_args={}) for i in range(1, 100_001))
    assert len(plan_problems(Plan(steps=steps), TOOLS)) == 1


@pytest.mark.parametrize("value", [0, -1, 1.5, "50", True, math.nan])
def test_max_steps_must_be_a_positive_integer(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"planner\.max_steps"):
        Config.from_dict({"planner": {"max_steps": value}}, "<t>")


def test_the_planner_section_has_no_other_keys() -> None:
    with pytest.raises(ConfigError, match=r"planner: Additional properties are not allowed \('max_step' "):
        Config.from_dict({"planner": {"max_step": 5}}, "<t>")


def test_a_tier_timeout_must_be_positive() -> None:
    tiers = [{"name": "fast", "model": "m", "timeout_s": 0}]
    with pytest.raises(ConfigError, match=r"models\.tiers\.0\.timeout_s"):
        Config.from_dict({"models": {"tiers": tiers}}, "<t>")
    config = Config.from_dict({"models": {"timeout_s": 9, "tiers": [{"name": "a", "model": "m", "timeout_s": 2},
                                                                    {"name": "b", "model": "m"}]}}, "<t>")
    assert [config.tier_timeout_s(t) for t in config.tiers] == [2.0, 9.0]


class Shop:
    """Registers ``refund`` and a template yielding 51 refund steps, and one taking any amount."""

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(refund)

    @hookimpl
    def agentkeel_register_plan_templates(self, register: Any) -> None:
        register(PlanTemplate(pattern=r"refund everything", steps=[STEP] * 51, name="bulk"))
        register(PlanTemplate(
            pattern=r"refund (?P<amount>\S+) for order (?P<order>\w+)",
            steps=[{"description": "refund", "tool_name": "refund",
                    "tool_args": {"order_id": "{order}", "amount": "{amount}"}}],
            name="by-amount",
        ))


def test_a_rules_plan_of_51_steps_is_rejected_before_anything_runs() -> None:
    with make_system(Shop(), principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="refund everything", user_id="agent"))
    assert response.status is RunStatus.REJECTED, response.message
    assert response.plan is not None and response.plan.planner == "rules:bulk"
    assert "the plan has 51 steps, more than the 50 allowed" in response.message
    assert response.steps == ()


def test_a_plugin_plan_of_51_steps_is_rejected_before_anything_runs() -> None:
    planner = ScriptedPlanner(wire(51))
    with make_system(Shop(), planner, principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="anything", user_id="agent"))
    assert response.status is RunStatus.REJECTED, response.message
    assert "the plan has 51 steps, more than the 50 allowed" in response.message
    assert response.steps == ()


def test_a_plugin_plan_of_50_steps_runs() -> None:
    planner = ScriptedPlanner(wire(50))
    with make_system(Shop(), planner, principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="anything", user_id="agent"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert len(response.steps) == 50


# --- arguments that are not JSON ---------------------------------------------------------


@pytest.mark.parametrize(("value", "name"), [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")])
def test_a_non_finite_argument_is_rejected_naming_the_field(value: float, name: str) -> None:
    plan = parse_plan({"reasoning": "r", "steps": [
        {"description": "d", "tool_name": "refund", "tool_args": {"order_id": "A1", "amount": value}}]})
    assert plan_problems(plan, TOOLS) == [f"step 1 (refund): argument amount: {name} is not a JSON number"]


def test_non_finite_numbers_in_conditions_and_nested_arguments_are_rejected() -> None:
    plan = parse_plan({"reasoning": "r", "steps": [
        STEP,
        {"description": "d", "tool_name": "refund",
         "tool_args": {"order_id": {"$ref": "/1/order_id"}, "amount": {"$ref": "/1/amount"}, "x": [1, math.nan]},
         "when": {"ref": "/1/amount", "op": "lt", "value": math.inf}},
    ]})
    assert plan_problems(plan, TOOLS) == [
        "step 2 (refund): argument x.1: NaN is not a JSON number",
        "step 2 (refund): condition value: Infinity is not a JSON number",
    ]


def test_arguments_nested_too_deep_are_rejected() -> None:
    value: Any = "leaf"
    for _ in range(100):
        value = [value]
    plan = parse_plan({"reasoning": "r", "steps": [
        {"description": "d", "tool_name": "refund", "tool_args": {"order_id": "A1", "amount": value}}]})
    [problem] = plan_problems(plan, TOOLS)
    assert problem.startswith("step 1 (refund): argument amount") and "nested more than 64 levels deep" in problem


def test_a_rules_plan_with_a_nan_amount_is_rejected_naming_the_field() -> None:
    # The rule planner turns the captured text "nan" into float("nan") for a number argument.
    with make_system(Shop(), principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="refund nan for order A7", user_id="agent"))
    assert response.status is RunStatus.REJECTED, response.message
    assert "step 1 (refund): argument amount: NaN is not a JSON number" in response.message
    assert response.steps == ()


def test_a_plugin_plan_with_infinity_is_rejected_naming_the_field() -> None:
    planner = ScriptedPlanner({"reasoning": "r", "steps": [
        {"description": "d", "tool_name": "refund", "tool_args": {"order_id": "A1", "amount": math.inf}}]})
    with make_system(Shop(), planner, principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="anything", user_id="agent"))
    assert response.status is RunStatus.REJECTED, response.message
    assert "argument amount: Infinity is not a JSON number" in response.message


def test_a_lone_surrogate_in_a_description_is_rejected() -> None:
    plan = parse_plan({"reasoning": "r", "steps": [{**STEP, "description": "bad \ud800"}]})
    [problem] = plan_problems(plan, TOOLS)
    assert problem.startswith("step 1 (refund): description: contains a lone surrogate (U+D800)")
