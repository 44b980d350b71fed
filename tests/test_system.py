"""The request pipeline end to end, with throwaway plugins registered in the test.

Each test named after a defect of the chapter's sketch (DESIGN.md) shows it fixed.
"""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import RunStatus, StepStatus, ToolError, Verdict, hookimpl, tool
from agentkeel.permissions.audit import verify
from agentkeel.testing import ScriptedPlanner, make_system


class Shop:
    """A throwaway tool plugin whose tools count their calls."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.fail_next: dict[str, int] = {}
        self.orders = {"1": {"order_id": "1", "status": "shipped", "total": 20.0},
                       "2": {"order_id": "2", "status": "pending", "total": 5.0}}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.fail_next.get(name, 0) > 0:
            self.fail_next[name] -= 1
            raise ToolError(f"{name} is temporarily down")

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        shop = self

        @tool(permissions=["read"], idempotent=True,
              output_schema={"type": "object", "required": ["status", "total"]})
        async def lookup(order_id: str) -> dict:
            """Look an order up."""
            shop._count("lookup")
            return shop.orders[order_id]

        @tool(permissions=["refunds"], idempotent=False, fallback="refund_by_ticket")
        async def refund(order_id: str, amount: float) -> dict:
            """Refund an order (never twice)."""
            shop._count("refund")
            return {"refund_id": f"r-{order_id}", "amount": amount}

        @tool(permissions=["refunds"], idempotent=True)
        async def refund_by_ticket(order_id: str, amount: float) -> dict:
            """Open a refund ticket for a human."""
            shop._count("refund_by_ticket")
            return {"ticket": f"t-{order_id}"}

        @tool(permissions=["read"], cost_usd=0.4, idempotent=True)
        def expensive(n: int) -> int:
            shop._count("expensive")
            return n

        for fn in (lookup, refund, refund_by_ticket, expensive):
            register(fn)


def step(tool_name: str, args: dict, **extra: Any) -> dict:
    return {"description": tool_name, "tool_name": tool_name, "tool_args": args, **extra}


def plan(*steps: dict) -> dict:
    return {"reasoning": "test", "steps": list(steps)}


REFUND_IF_SHIPPED = plan(
    step("lookup", {"order_id": "{id}"}),
    step("refund", {"order_id": "{id}", "amount": {"$ref": "/1/total"}},
         when={"ref": "/1/status", "op": "eq", "value": "shipped"}),
)


def refund_if_shipped(order_id: str) -> dict:
    import json

    return json.loads(json.dumps(REFUND_IF_SHIPPED).replace("{id}", order_id))


AGENT = {"agent": ["read", "refunds"]}


async def run(system: Any, message: str = "do it", user: str = "agent", **kw: Any) -> Any:
    from agentkeel import AgentRequest

    async with system:
        return await system.run(AgentRequest(message=message, user_id=user, **kw))


async def test_defect10_refund_only_when_shipped() -> None:
    shop = Shop()
    shipped = await run(make_system(shop, ScriptedPlanner(refund_if_shipped("1")), principals=AGENT))
    assert shipped.status is RunStatus.SUCCEEDED
    assert [s.status for s in shipped.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
    assert shipped.steps[1].tool_args == {"order_id": "1", "amount": 20.0}
    pending = await run(make_system(shop, ScriptedPlanner(refund_if_shipped("2")), principals=AGENT))
    assert pending.status is RunStatus.SUCCEEDED
    assert pending.steps[1].status is StepStatus.SKIPPED
    assert shop.calls["refund"] == 1


async def test_defect2_non_idempotent_tool_is_never_retried() -> None:
    shop = Shop()
    shop.fail_next["refund"] = 1
    shop.fail_next["lookup"] = 2
    planner = ScriptedPlanner(plan(step("lookup", {"order_id": "1"}), step("refund", {"order_id": "1", "amount": 1})))
    system = make_system(shop, planner, principals=AGENT,
                         config={"retry": {"base_delay_s": 0.0, "max_attempts": 3}})
    response = await run(system)
    assert response.steps[0].status is StepStatus.SUCCEEDED
    assert response.steps[0].attempts == 3  # idempotent: retried
    assert shop.calls["refund"] == 1  # never twice...
    assert shop.calls["refund_by_ticket"] == 1  # ...its declared fallback took over
    assert response.steps[1].status is StepStatus.SUCCEEDED
    assert response.steps[1].tool_name == "refund_by_ticket"


async def test_failed_step_skips_its_dependents_and_fails_the_run() -> None:
    shop = Shop()
    shop.fail_next["lookup"] = 10
    planner = ScriptedPlanner(refund_if_shipped("1"))
    system = make_system(shop, planner, principals=AGENT, config={"retry": {"base_delay_s": 0.0}})
    response = await run(system)
    assert response.status is RunStatus.FAILED
    assert response.steps[0].status is StepStatus.FAILED
    assert "temporarily down" in (response.steps[0].error or "")
    assert response.steps[1].status is StepStatus.SKIPPED
    assert "run stopped at step 1" in (response.steps[1].error or "")
    assert "refund" not in shop.calls


async def test_defect4_unknown_user_is_denied_whatever_it_claims() -> None:
    shop = Shop()
    response = await run(make_system(shop, ScriptedPlanner(refund_if_shipped("1")), principals=AGENT),
                         user="mallory")
    assert response.status is RunStatus.DENIED
    assert "unknown principal 'mallory'" in response.message
    assert shop.calls == {}


async def test_defect5_planner_sees_only_permitted_tools_and_denial_is_audited(isolated_home: Any) -> None:
    shop = Shop()
    planner = ScriptedPlanner(refund_if_shipped("1"))
    response = await run(make_system(shop, planner, principals={"viewer": ["read"]}), user="viewer")
    assert planner.seen_tools == [["expensive", "lookup"]]
    assert response.status is RunStatus.DENIED
    assert "lacks permission(s) ['refunds'] for 'refund'" in response.message
    assert shop.calls == {}  # nothing ran
    result = verify(isolated_home / "audit.jsonl")
    assert result.ok and result.records >= 1


async def test_argument_constraints_deny_at_step_time() -> None:
    shop = Shop()
    config = {"principals": {"agent": {"permissions": ["read", "refunds"],
                                        "constraints": {"refund": {"amount": {"maximum": 10}}}}}}
    response = await run(make_system(shop, ScriptedPlanner(refund_if_shipped("1")), config=config))
    assert response.status is RunStatus.DENIED
    assert response.steps[1].status is StepStatus.DENIED
    assert "refund.amount" in (response.steps[1].error or "")
    assert "refund" not in shop.calls


async def test_defect8_hallucinated_tool_and_bad_args_are_rejected_before_anything_runs() -> None:
    shop = Shop()
    bad = plan(step("lookup", {"order_id": "1"}), step("teleport", {}), step("lookup", {"order_id": 7}))
    response = await run(make_system(shop, ScriptedPlanner(bad), principals=AGENT))
    assert response.status is RunStatus.REJECTED
    assert "step 2 (teleport): no tool 'teleport'" in response.message
    assert "step 3 (lookup): argument order_id: 7 is not of type 'string'" in response.message
    assert shop.calls == {}


async def test_forward_reference_is_rejected() -> None:
    shop = Shop()
    bad = plan(step("lookup", {"order_id": {"$ref": "/2/order_id"}}), step("lookup", {"order_id": "1"}))
    response = await run(make_system(shop, ScriptedPlanner(bad), principals=AGENT))
    assert response.status is RunStatus.REJECTED
    assert "may only refer to earlier steps" in response.message


async def test_defect1_spending_is_recorded_and_the_budget_bites() -> None:
    shop = Shop()
    two = plan(step("expensive", {"n": 1}), step("expensive", {"n": 2}))
    ok = await run(make_system(shop, ScriptedPlanner(two), principals=AGENT), budget_usd=1.0)
    assert ok.status is RunStatus.SUCCEEDED
    assert ok.total_cost_usd == pytest.approx(0.8)
    assert ok.cost_breakdown()["by_tool"] == {"expensive": pytest.approx(0.8)}
    three = plan(*(step("expensive", {"n": i}) for i in range(3)))
    stopped = await run(make_system(shop, ScriptedPlanner(three), principals=AGENT), budget_usd=1.0)
    assert stopped.status is RunStatus.REJECTED
    assert "exceeds the $1.0000 budget" in stopped.message
    assert shop.calls["expensive"] == 2


async def test_defect6_evaluator_and_recovery_are_called() -> None:
    class Strict:
        """Rejects every refund, and the first lookup result."""

        def __init__(self) -> None:
            self.rejected_lookups = 0

        @hookimpl
        def agentkeel_evaluate(self, tool: Any, result: Any) -> Verdict | None:
            if tool.name == "refund":
                return Verdict(False, 0.1, "refund id looks wrong")
            if tool.name == "lookup" and self.rejected_lookups == 0:
                self.rejected_lookups += 1
                return Verdict(False, 0.2, "stale order data")
            return None

    class RecoverySpy:
        def __init__(self) -> None:
            self.asked: list[tuple[str, int, bool]] = []

        @hookimpl(tryfirst=True)
        def agentkeel_recover(self, tool: Any, error: str, attempt: int, retryable: bool) -> None:
            self.asked.append((tool.name, attempt, retryable))
            return None  # abstain: the default recovery decides

    # A retry-safe tool whose result is rejected: recovery is asked, and it is retried.
    shop, strict, spy = Shop(), Strict(), RecoverySpy()
    planner = ScriptedPlanner(plan(step("lookup", {"order_id": "1"})))
    system = make_system(shop, planner, strict, spy, principals=AGENT, config={"retry": {"base_delay_s": 0.0}})
    retried = await run(system)
    assert retried.status is RunStatus.SUCCEEDED, retried.message
    assert shop.calls == {"lookup": 2}
    assert retried.steps[0].attempts == 2
    assert spy.asked == [("lookup", 1, True)]

    # A tool that is not retry-safe: it ran, its effect stands. The step fails at once, with its
    # result and the failed verdict; neither a retry nor the fallback may repeat the effect.
    shop, spy = Shop(), RecoverySpy()
    planner = ScriptedPlanner(plan(step("refund", {"order_id": "1", "amount": 1})))
    response = await run(make_system(shop, planner, Strict(), spy, principals=AGENT))
    assert shop.calls == {"refund": 1}
    assert spy.asked == []
    assert response.status is RunStatus.FAILED
    [refund] = response.steps
    assert (refund.tool_name, refund.status, refund.attempts) == ("refund", StepStatus.FAILED, 1)
    assert refund.result == {"refund_id": "r-1", "amount": 1}
    assert refund.verdict == Verdict(False, 0.1, "refund id looks wrong")
    assert "refund is not retry-safe" in (refund.error or "")


async def test_step_expectation_is_checked() -> None:
    shop = Shop()
    planner = ScriptedPlanner(plan(step("lookup", {"order_id": "1"}, expect={"required": ["tracking"]})))
    system = make_system(shop, planner, principals=AGENT, config={"retry": {"base_delay_s": 0, "max_attempts": 2}})
    response = await run(system)
    assert response.status is RunStatus.FAILED
    assert "'tracking' is a required property" in (response.steps[0].error or "")
    assert shop.calls["lookup"] == 2


@pytest.mark.parametrize("name", ["memory_sqlite", "agentkeel.memory.sqlite"])  # the old name still works
async def test_defect11_runs_without_a_memory_manager(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", name)
    shop = Shop()
    system = make_system(shop, ScriptedPlanner(refund_if_shipped("1")), principals=AGENT)
    assert system.plugins.pm.get_plugin("agentkeel.memory.sqlite") is None
    assert not system.plugins.hook.agentkeel_load_context.get_hookimpls()
    response = await run(system)
    assert response.status is RunStatus.SUCCEEDED


async def test_defect12_open_breaker_degrades_to_the_fallback() -> None:
    shop = Shop()
    shop.fail_next["refund"] = 100
    system = make_system(shop, ScriptedPlanner(plan(step("refund", {"order_id": "1", "amount": 1}))),
                         principals=AGENT, config={"breaker": {"failure_threshold": 2, "reset_after_s": 60}})
    async with system:
        from agentkeel import AgentRequest

        for _ in range(3):
            response = await system.run(AgentRequest(message="m", user_id="agent"))
            assert response.steps[0].tool_name == "refund_by_ticket"
    # Two real failures opened the breaker; the third request never reached the tool.
    assert shop.calls["refund"] == 2
    assert shop.calls["refund_by_ticket"] == 3


async def test_no_planner_answer_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    response = await run(make_system(Shop(), principals=AGENT), message="something no template knows")
    assert response.status is RunStatus.FAILED
    assert response.config_error  # the configuration's fault: the CLI exits 2
    assert "no plan template matched" in response.message


async def test_per_tool_timeout_override_from_config() -> None:
    import asyncio

    class Slow:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            @tool(timeout=30.0, idempotent=False)
            async def slow() -> str:
                await asyncio.sleep(5)
                return "done"

            register(slow)

    planner = ScriptedPlanner(plan(step("slow", {})))
    # slow declares no permissions: only a principal that lists it may call it.
    system = make_system(Slow(), planner, config={"principals": {"tester": {"permissions": [], "tools": ["slow"]}},
                                                  "tools": {"slow": {"timeout": 0.05}}})
    assert system.tools["slow"].timeout == 0.05
    response = await run(system, user="tester")
    # Given up at its deadline, a tool that is not retry-safe may have taken effect: a human decides.
    assert response.status is RunStatus.IN_DOUBT
    assert "timed out after 0.05s" in (response.steps[0].error or "")
    assert "--resolve 1=done" in response.message


async def test_memory_turns_reach_the_next_plan() -> None:
    seen: list[Any] = []

    class Recorder(ScriptedPlanner):
        @hookimpl(tryfirst=True)
        def agentkeel_plan(self, tools: Any, context: Any = None) -> Any:  # type: ignore[override]
            seen.append(context)
            return super().agentkeel_plan(tools)

    shop = Shop()
    system = make_system(shop, Recorder(refund_if_shipped("2")), principals=AGENT)
    from agentkeel import AgentRequest

    async with system:
        await system.run(AgentRequest(message="first question", user_id="agent", session_id="s1"))
        await system.run(AgentRequest(message="second question", user_id="agent", session_id="s1"))
        await system.run(AgentRequest(message="other session", user_id="agent", session_id="s2"))
    assert seen[0].turns == ()
    assert seen[1].turns[0]["content"] == "first question"
    assert seen[1].turns[1]["role"] == "assistant"
    assert seen[2].turns == ()
