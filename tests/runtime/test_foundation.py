"""Regression tests for the foundation redesign: each one failed before its fix."""

from __future__ import annotations

import socket
from collections.abc import Generator
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl, tool
from agentkeel.config import Config
from agentkeel.errors import AgentkeelError, ConfigError, PluginError, ToolSpecError
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import ScriptedPlanner, make_system

REFUNDS: dict[str, list[float]] = {}


@tool(permissions=["refunds"], rollback="undo_refund", allow_uncancellable=True,
      output_schema={"type": "object", "required": ["refund_id"]})
def pay(order: str, amount: float) -> dict[str, Any]:
    """A refund that reports success in a shape the evaluator rejects when amount > 100."""
    REFUNDS.setdefault(order, []).append(amount)
    return {"refund_id": f"r-{order}"} if amount <= 100 else {"status": "odd"}


@tool(permissions=["refunds"], idempotent=True)
def undo_refund(order: str) -> dict[str, Any]:
    """Undo every refund of ``order``."""
    REFUNDS.pop(order, None)
    return {"undone": order}


@tool(permissions=["refunds"], allow_uncancellable=True)
def fail_always(order: str) -> dict[str, Any]:
    """A business refusal."""
    from agentkeel.errors import ToolError

    raise ToolError(f"no for {order}", retryable=False)


@tool(allow_uncancellable=True)
def open_tool(x: int) -> int:
    """Declares no permissions."""
    return x


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (pay, undo_refund, fail_always, open_tool):
            register(fn)


def plan(*steps: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"reasoning": "test", "steps": [
        {"description": name, "tool_name": name, "tool_args": args} for name, args in steps]}


def system_for(wire: dict[str, Any], *extra: object, principals: dict[str, Any] | None = None,
               **config: Any) -> AgentSystem:
    data: dict[str, Any] = {"principals": principals or {"agent": {"permissions": ["refunds"]}}, **config}
    return AgentSystem(Config.from_dict(data, "<test>"), plugins=(Tools(), ScriptedPlanner(wire), *extra),
                       load_entrypoints=False)


@pytest.fixture(autouse=True)
def _clean_refunds() -> Generator[None, None, None]:
    REFUNDS.clear()
    yield
    REFUNDS.clear()


def test_constraints_belong_to_their_own_system() -> None:
    wire = plan(("pay", {"order": "a", "amount": 50}))
    loose = {"agent": {"permissions": ["refunds"], "constraints": {"pay": {"amount": {"maximum": 100}}}}}
    tight = {"agent": {"permissions": ["refunds"], "constraints": {"pay": {"amount": {"maximum": 10}}}}}
    with system_for(wire, principals=loose) as first:
        assert first.run_sync(AgentRequest(message="m", user_id="agent")).status is RunStatus.SUCCEEDED
    with system_for(wire, principals=tight) as second:
        response = second.run_sync(AgentRequest(message="m", user_id="agent"))
    assert response.status is RunStatus.DENIED, response.message
    assert "maximum" in response.message


def test_rejected_effect_is_journaled_compensated_and_never_retried() -> None:
    with system_for(plan(("pay", {"order": "b", "amount": 500}))) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="agent"))
        assert response.status is RunStatus.FAILED
        assert REFUNDS == {}, "the rejected refund must be compensated when the run aborts"
        step = response.steps[0]
        assert step.status is StepStatus.COMPENSATED and step.attempts == 1
        state = system.journal.load(response.run_id)
        outcome = state.forward(1)[1]
        assert outcome is not None and outcome.result == {"status": "odd"}
        assert outcome.verdict is not None and outcome.verdict["passed"] is False
        undo = state.compensation(1)[1]
        assert undo is not None and undo.status == "succeeded"
        again = system.rollback_sync(response.run_id)
    assert again.status is RunStatus.FAILED, "nothing left to undo: the run is not reported rolled back"
    assert "nothing to roll back" in again.message


def test_rollback_twice_is_a_no_op_that_says_so() -> None:
    with system_for(plan(("pay", {"order": "c", "amount": 5}))) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="agent"))
        assert response.ok and REFUNDS == {"c": [5]}
        first = system.rollback_sync(response.run_id)
        assert first.status is RunStatus.ROLLED_BACK and REFUNDS == {}
        second = system.rollback_sync(response.run_id)
    assert second.status is RunStatus.ROLLED_BACK
    assert "already rolled back" in second.message


@pytest.mark.parametrize(
    ("user", "wire", "budget", "status"),
    [
        ("stranger", plan(("pay", {"order": "d", "amount": 1})), None, RunStatus.DENIED),
        ("agent", plan(("nope", {})), None, RunStatus.REJECTED),
        ("agent", plan(("open_tool", {"x": 1})), None, RunStatus.DENIED),
    ],
)
def test_refused_requests_are_journaled(user: str, wire: dict[str, Any], budget: float | None,
                                        status: RunStatus) -> None:
    with system_for(wire) as system:
        response = system.run_sync(AgentRequest(message="m", user_id=user, budget_usd=budget))
        assert response.status is status, response.message
        shown = system.show(response.run_id)
        assert shown.status is status and shown.message == response.message
        assert response.run_id in {r.run_id for r in system.runs()}


def test_planning_failure_is_journaled_and_a_config_error() -> None:
    system = AgentSystem(Config.from_dict({"principals": {"agent": {"permissions": []}}}, "<test>"),
                         plugins=(Tools(),), load_entrypoints=False)
    with system:
        response = system.run_sync(AgentRequest(message="something no template matches", user_id="agent"))
        assert response.status is RunStatus.FAILED and response.config_error, response.message
        assert system.show(response.run_id).status is RunStatus.FAILED


def test_tool_without_permissions_needs_an_explicit_grant() -> None:
    wire = plan(("open_tool", {"x": 3}))
    with system_for(wire, principals={"agent": {"permissions": []}}) as system:
        assert system.run_sync(AgentRequest(message="m", user_id="agent")).status is RunStatus.DENIED
    listed = {"agent": {"permissions": [], "tools": ["open_tool"]}}
    with system_for(wire, principals=listed) as system:
        assert system.run_sync(AgentRequest(message="m", user_id="agent")).ok


def test_async_planner_can_abstain() -> None:
    class Abstains:
        @hookimpl(tryfirst=True)
        async def agentkeel_plan(self) -> None:
            return None

    with system_for(plan(("pay", {"order": "e", "amount": 1})), Abstains()) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="agent"))
    assert response.ok, response.message
    assert response.plan is not None and response.plan.planner == "scripted"


def test_call_tool_wrapper_sees_forward_and_compensating_calls() -> None:
    seen: list[tuple[str, str, int]] = []

    class Tracer:
        @hookimpl(wrapper=True)
        def agentkeel_call_tool(self, call: Any) -> Generator[None, Any, Any]:
            inner = yield

            async def traced() -> Any:
                seen.append((call.kind, call.spec.name, call.attempt))
                return await inner

            return traced()

    wire = plan(("pay", {"order": "f", "amount": 5}), ("fail_always", {"order": "f"}))
    with system_for(wire, Tracer()) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="agent"))
    assert response.status is RunStatus.FAILED
    assert seen == [("forward", "pay", 1), ("forward", "fail_always", 1), ("compensation", "undo_refund", 1)]
    assert REFUNDS == {}


def test_run_sync_serves_many_requests() -> None:
    with system_for(plan(("pay", {"order": "g", "amount": 1}))) as system:
        for _ in range(3):
            assert system.run_sync(AgentRequest(message="m", user_id="agent")).ok
    assert REFUNDS == {"g": [1, 1, 1]}


def test_lease_released_when_rollback_cannot_start() -> None:
    with system_for(plan(("pay", {"order": "h", "amount": 1}))) as system:
        run_id = system.run_sync(AgentRequest(message="m", user_id="agent")).run_id
    bare = AgentSystem(Config.from_dict({"principals": {"agent": {"permissions": ["refunds"]}}}, "<test>"),
                       load_entrypoints=False)
    with bare:
        with pytest.raises(AgentkeelError, match="needs tools"):
            bare.rollback_sync(run_id)
        assert bare.journal.load(run_id).run.owner == ""


def test_registered_sandbox_names_are_usable_and_ranked() -> None:
    class Custom:
        strength = 5

        def __init__(self) -> None:
            self.calls = 0

        async def run(self, call: Any) -> Any:
            self.calls += 1
            return call.spec.fn(**call.args)

        async def aclose(self) -> None:
            return None

    custom = Custom()

    @tool(isolation="custom", permissions=["refunds"])
    def in_custom(x: int) -> int:
        """Runs in the custom sandbox."""
        return x * 2

    class Plugin:
        @hookimpl
        def agentkeel_register_sandboxes(self, register: Any) -> None:
            register("custom", custom)

        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            register(in_custom)

    with system_for(plan(("in_custom", {"x": 2})), Plugin()) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="agent"))
    assert response.ok and response.steps[0].result == 4 and custom.calls == 1
    with pytest.raises(ConfigError, match="weaker"):
        system_for(plan(), Plugin(), tools={"in_custom": {"isolation": "inprocess"}})
    with pytest.raises(PluginError, match="already registered"):
        system_for(plan(), Plugin(), Plugin())


def test_override_for_an_unknown_tool_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tools.typo"):
        system_for(plan(), tools={"typo": {"timeout": 1.0}})


def test_duplicate_tool_names_both_plugins_and_blames_the_later() -> None:
    class Again:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            register(pay)

    with pytest.raises(ToolSpecError) as info:
        system_for(plan(), Again())
    assert info.value.plugin == "Again"
    assert "already registered by plugin 'Tools'" in str(info.value)
    assert "AGENTKEEL_DISABLE_PLUGINS=Again" in str(info.value)


def test_a_class_is_refused_as_a_plugin() -> None:
    with pytest.raises(PluginError, match="is a class"):
        make_system(Tools)


def test_tolerant_system_reports_the_broken_plugin() -> None:
    class Broken:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            raise RuntimeError("boom")

    system = AgentSystem(Config.from_dict({"principals": {}}, "<t>"), plugins=(Tools(), Broken()),
                         load_entrypoints=False, tolerant=True)
    assert [b.name for b in system.broken_plugins] == ["Broken"]
    assert "boom" in system.broken_plugins[0].error and "pay" in system.tools


@pytest.mark.parametrize("budget", [float("nan"), float("inf"), -1.0])
def test_non_finite_budgets_are_refused(budget: float) -> None:
    with pytest.raises(ValueError, match="budget"):
        AgentRequest(message="m", user_id="u", budget_usd=budget)
    with pytest.raises(ConfigError, match="finite"):
        Config.from_dict({"budget": {"default_usd": budget}} if budget != -1.0 else {"prices": {
            "m": {"input_per_mtok": float("nan"), "output_per_mtok": 0}}}, "<t>")


@pytest.mark.parametrize("field", ["message", "user_id", "run_id"])
def test_text_that_is_not_utf8_is_refused(field: str) -> None:
    values = {"message": "m", "user_id": "u", field: "bad \udcff"}
    with pytest.raises(ValueError, match="UTF-8"):
        AgentRequest(**values)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _llm_system(base_url: str, timeout_s: float = 5.0) -> AgentSystem:
    data = {
        "principals": {"agent": {"permissions": ["refunds"]}},
        "models": {"base_url": base_url, "timeout_s": timeout_s,
                   "tiers": [{"name": "fast", "model": "m", "max_tokens": 100}]},
        "prices": {"m": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        "plugins": {"planner_llm": {"max_retries": 0}},
    }
    return AgentSystem(Config.from_dict(data, "<t>"), plugins=(Tools(),), load_entrypoints=False)


def test_llm_call_that_never_reached_a_server_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    with _llm_system(f"http://127.0.0.1:{_free_port()}/v1") as system:
        response = system.run_sync(AgentRequest(message="plan something", user_id="agent"))
    assert response.status is RunStatus.FAILED
    assert response.total_cost_usd == 0.0 and response.costs == ()


def test_llm_call_that_timed_out_is_charged_as_an_estimate(openai_server: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    openai_server.queue_slow(3.0, {"reasoning": "", "steps": []})
    with _llm_system(openai_server.base_url, timeout_s=0.5) as system:
        response = system.run_sync(AgentRequest(message="plan something", user_id="agent"))
        assert response.status is RunStatus.FAILED
        assert [c.estimated for c in response.costs] == [True]
        assert response.total_cost_usd > 0
        assert system.show(response.run_id).total_cost_usd == pytest.approx(response.total_cost_usd)


def test_lease_released_when_resume_refuses_a_resolution() -> None:
    with system_for(plan(("pay", {"order": "i", "amount": 1}))) as system:
        run_id = system.run_sync(AgentRequest(message="m", user_id="agent")).run_id
        journal = system.journal
        lease = journal.acquire(run_id, system.owner, 30)
        journal.set_status(lease, "running", "")
        journal.release(lease)
        with pytest.raises(AgentkeelError, match="not in doubt"):
            system.resume_sync(run_id, {1: True})
        assert journal.load(run_id).run.owner == ""


def test_schema_cache_is_bounded() -> None:
    from agentkeel.tools.validation import _CompiledCache

    cache = _CompiledCache(size=8)
    schemas = [{"type": "object", "properties": {f"p{i}": {"type": "integer"}}} for i in range(50)]
    for schema in schemas:
        assert cache.get(schema).schema is schema
    assert len(cache) == 8
    assert cache.get(schemas[-1]) is cache.get(schemas[-1])
