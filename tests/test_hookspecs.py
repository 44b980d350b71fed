"""Meta-tests: every hook specification is documented, and the host calls every hook.

The coverage test does not call hooks itself: a tracer plugin wraps every hook
(``wrapper=True``) and records what the host called while serving real requests.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Generator, Mapping
from typing import Any

import pytest
from agentkeel import AgentRequest, Plan, RunStatus, StepStatus, ToolError, hookimpl, hookspecs, tool
from agentkeel.planner.plan import parse_plan
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.testing import OpenAIServer, make_system

HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction)
                    if name.startswith("agentkeel_"))
REGISTRATION = {name for name in HOOK_NAMES if name.startswith("agentkeel_register_")}
SERVICE = {"agentkeel_open_key_store"}
"""Hooks of the HTTP service and its commands (``agentkeel serve``, ``agentkeel keys``): a run never calls them."""


def return_section(doc: str) -> str:
    """The text of the ``:return:`` field, up to the next field or the end."""
    found = re.search(r"^:return:(.*?)(?=^:\w|\Z)", doc, re.MULTILINE | re.DOTALL)
    return " ".join(found.group(1).split()) if found else ""


def test_every_hookspec_is_documented() -> None:
    assert len(HOOK_NAMES) >= 15
    assert len(REGISTRATION) == 3
    for name in HOOK_NAMES:
        spec = getattr(hookspecs, name)
        doc = inspect.getdoc(spec) or ""
        summary = doc.split("\n\n", 1)[0]
        assert summary and not summary.startswith(":"), f"{name} must say what it is for"
        params = list(inspect.signature(spec).parameters)
        documented = re.findall(r"^:param (\w+):", doc, re.MULTILINE)
        assert documented == params, f"{name} must document each argument, in order, with ':param NAME:'"
        for param in params:
            text = re.search(rf"^:param {param}:(.*?)(?=^:\w|\Z)", doc, re.MULTILINE | re.DOTALL)
            assert text is not None and text.group(1).strip(), f"{name}: ':param {param}:' says nothing"
        returns = return_section(doc)
        assert returns, f"{name} must have a ':return:' field"
        if spec.agentkeel_spec.get("firstresult"):
            assert "firstresult" in returns and "Not firstresult" not in returns, (
                f"{name} is firstresult and its ':return:' must say so"
            )
        else:
            assert "Not firstresult" in returns, f"{name} is not firstresult and its ':return:' must say so"


def test_the_return_field_parser_sees_only_the_return_field() -> None:
    doc = "Do it.\n\n:param a: the a.\n:return: a value. Not firstresult.\n"
    assert return_section(doc) == "a value. Not firstresult."
    assert return_section("Do it.\n\n:param a: Not firstresult.\n") == ""


class Tracer:
    """Wraps every hook (``wrapper=True``) and records what the host called.

    ``called`` counts calls by hook name; ``tool_calls`` holds every
    ``agentkeel_call_tool`` call (forward and compensating) as ``(tool, kind, attempt)``.
    """

    def __init__(self) -> None:
        self.called: dict[str, int] = {}
        self.tool_calls: list[tuple[str, str, int]] = []
        for name in HOOK_NAMES:
            if name != "agentkeel_call_tool":
                setattr(self, f"trace_{name}", self._wrapper(name))

    def _wrapper(self, name: str) -> Any:
        @hookimpl(wrapper=True, specname=name)
        def trace() -> Generator[None, Any, Any]:
            self.called[name] = self.called.get(name, 0) + 1
            return (yield)

        return trace

    @hookimpl(wrapper=True, specname="agentkeel_call_tool")
    def trace_agentkeel_call_tool(self, call: ToolCall) -> Generator[None, Any, Any]:
        self.called["agentkeel_call_tool"] = self.called.get("agentkeel_call_tool", 0) + 1
        self.tool_calls.append((call.spec.name, call.kind, call.attempt))
        return (yield)


class Shop:
    """Tools for the traced requests: a lookup that fails once when asked to, a charge
    with a compensator, and a tool that always fails (so a run aborts)."""

    def __init__(self) -> None:
        self.lookup_failures = 0
        self.charges: list[str] = []
        self.refunds: list[str] = []

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        shop = self

        @tool(permissions=["shop"], idempotent=True)
        def lookup(order_id: str) -> dict[str, Any]:
            """Look an order up."""
            if shop.lookup_failures:
                shop.lookup_failures -= 1
                raise ToolError("the order database is busy")
            return {"order_id": order_id, "status": "shipped"}

        @tool(permissions=["shop"], rollback="refund")
        def charge(amount: float, idempotency_key: str) -> dict[str, Any]:
            """Charge the customer."""
            shop.charges.append(idempotency_key)
            return {"charge_id": idempotency_key, "amount": amount}

        @tool(permissions=["shop"], idempotent=True)
        def refund(charge_id: str) -> dict[str, Any]:
            """Undo a charge."""
            shop.refunds.append(charge_id)
            return {"refunded": charge_id}

        @tool(permissions=["shop"], allow_uncancellable=True)
        def ship(order_id: str) -> None:
            """Ship an order (the warehouse is down)."""
            raise ToolError("the warehouse is closed", retryable=False)

        for fn in (lookup, charge, refund, ship):
            register(fn)


def step(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"description": tool_name, "tool_name": tool_name, "tool_args": args}


PLANS = {
    "look up order 1": [step("lookup", order_id="1")],
    "look up order 2 (flaky)": [step("lookup", order_id="2")],
    "charge then ship": [step("charge", amount=5.0), step("ship", order_id="3")],
}
LLM_PLAN = {"reasoning": "look it up", "steps": [step("lookup", order_id="4")]}


class ByMessage:
    """Plans the known messages itself and abstains on the rest (the LLM planner answers)."""

    @hookimpl(tryfirst=True)
    def agentkeel_plan(self, request: AgentRequest, tools: Mapping[str, Any]) -> Plan | None:
        steps = PLANS.get(request.message)
        if steps is None:
            return None
        return parse_plan({"reasoning": "by message", "steps": steps}, planner="by-message")


async def test_every_hook_is_called_by_the_host_during_real_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    tracer, shop = Tracer(), Shop()
    with OpenAIServer() as server:
        server.queue(LLM_PLAN, usage=(300, 40))
        config = {
            "models": {"base_url": server.base_url, "tiers": [{"name": "fast", "model": "m-fast"}]},
            "prices": {"m-fast": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
            "retry": {"base_delay_s": 0.0},
            # One LLM call in all: the planner's. Answers come from the deterministic responder.
            "responder": {"mode": "template"},
            "recovery": {"max_replans": 0},
        }
        system = make_system(shop, ByMessage(), tracer, principals={"agent": ["shop"]}, config=config)
        async with system:
            assert tracer.called.get("agentkeel_startup") == 1
            ok = await system.run(AgentRequest(message="look up order 1", user_id="agent"))
            shop.lookup_failures = 1
            retried = await system.run(AgentRequest(message="look up order 2 (flaky)", user_id="agent"))
            planned = await system.run(AgentRequest(message="ask the model about order 4", user_id="agent"))
            aborted = await system.run(AgentRequest(message="charge then ship", user_id="agent"))
            assert "agentkeel_shutdown" not in tracer.called
        assert server.pending == 0 and len(server.requests) == 1

    # The requests did what they were meant to, so the hooks were reached the way the host reaches them.
    assert ok.status is RunStatus.SUCCEEDED, ok.message
    assert retried.status is RunStatus.SUCCEEDED and retried.steps[0].attempts == 2, retried.message
    assert planned.status is RunStatus.SUCCEEDED and planned.plan is not None, planned.message
    assert planned.plan.planner == "llm:fast"
    assert [c.tier for c in planned.costs] == ["fast"] and planned.total_cost_usd == pytest.approx(
        (300 * 1.0 + 40 * 2.0) / 1e6)
    assert aborted.status is RunStatus.FAILED, aborted.message
    assert [s.status for s in aborted.steps] == [StepStatus.COMPENSATED, StepStatus.FAILED]
    assert shop.refunds == shop.charges == [f"{aborted.run_id}:1"]

    expected = set(HOOK_NAMES) - REGISTRATION - SERVICE
    assert len(expected) >= 14
    missing = expected - set(tracer.called)
    assert not missing, f"hooks the host never called: {sorted(missing)}"
    assert tracer.called["agentkeel_shutdown"] == 1
    assert tracer.called["agentkeel_open_journal"] == 1  # once per system, on first use
    assert tracer.called["agentkeel_recover"] >= 1
    assert tracer.called["agentkeel_model_price"] >= 1
    # Every tool call attempt went through agentkeel_call_tool, the compensating one included.
    assert tracer.tool_calls == [
        ("lookup", "forward", 1),
        ("lookup", "forward", 1), ("lookup", "forward", 2),
        ("lookup", "forward", 1),
        ("charge", "forward", 1), ("ship", "forward", 1), ("refund", "compensation", 1),
    ]
