"""The rule planner: the templates the host passes it, matched before any LLM is asked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentkeel import AgentRequest, Config, PlanTemplate, Principal, RunStatus, hookimpl, tool
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.planner import rules
from agentkeel.testing import make_system
from agentkeel.tools.decorator import spec_of
from agentkeel.types import ToolSpec


@tool(permissions=["shop"], allow_uncancellable=True)
def refund(order_id: str, amount: float, units: int = 1) -> dict[str, Any]:
    """Refund an order."""
    return {"order_id": order_id, "amount": amount, "units": units}


REFUND = spec_of(refund)
assert REFUND is not None

BY_AMOUNT = PlanTemplate(
    pattern=r"refund (?P<amount>[\d.]+) for order (?P<order>\w+)(?: x(?P<units>\d+))?",
    steps=[{"description": "refund", "tool_name": "refund",
            "tool_args": {"order_id": "{order}", "amount": "{amount}", "units": "{units}"}}],
    name="by-amount",
)
NEEDS_MISSING_TOOL = PlanTemplate(
    pattern=r"refund .*", steps=[{"description": "x", "tool_name": "not_installed", "tool_args": {}}], name="ghost",
)


def run_for(message: str, tools: dict[str, ToolSpec]) -> RunContext:
    config = Config.from_dict({}, "<test>")
    return RunContext(AgentRequest(message=message, user_id="u"), Principal("u"), config, Budget(1.0),
                      Pricer(lambda model, cfg: None, config), tools)


def plan(message: str, templates: Sequence[PlanTemplate], tools: dict[str, ToolSpec] | None = None) -> Any:
    registered = {"refund": REFUND} if tools is None else tools
    run = run_for(message, registered)
    return rules.agentkeel_plan(request=run.request, run=run, templates=templates)


def test_the_first_matching_template_yields_the_plan_with_typed_arguments() -> None:
    found = plan("Refund 12.5 for order A7 x3", [BY_AMOUNT])
    assert found.planner == "rules:by-amount"
    [step] = found.steps
    assert dict(step.tool_args) == {"order_id": "A7", "amount": 12.5, "units": 3}


def test_no_match_abstains_so_the_next_planner_is_asked() -> None:
    assert plan("what is the weather", [BY_AMOUNT]) is None
    assert plan("refund 1 for order A7", []) is None


def test_a_template_needing_a_tool_that_is_not_registered_is_skipped() -> None:
    assert plan("refund 1 for order A7", [NEEDS_MISSING_TOOL, BY_AMOUNT]).planner == "rules:by-amount"
    assert plan("refund 1 for order A7", [NEEDS_MISSING_TOOL]) is None
    assert plan("refund 1 for order A7", [BY_AMOUNT], tools={}) is None


def test_the_host_passes_the_registered_templates_in_order() -> None:
    seen: list[list[str]] = []

    class Shop:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            register(refund)

        @hookimpl
        def agentkeel_register_plan_templates(self, register: Any) -> None:
            register(NEEDS_MISSING_TOOL)
            register(BY_AMOUNT)

    class Watcher:
        @hookimpl(tryfirst=True)
        def agentkeel_plan(self, templates: Sequence[PlanTemplate]) -> None:
            seen.append([t.name for t in templates])

    with make_system(Shop(), Watcher(), principals={"agent": ["shop"]}) as system:
        response = system.run_sync(AgentRequest(message="refund 5 for order B2 x2", user_id="agent"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.plan is not None and response.plan.planner == "rules:by-amount"
    assert response.steps[0].result == {"order_id": "B2", "amount": 5.0, "units": 2}
    assert seen == [["ghost", "by-amount"]]
