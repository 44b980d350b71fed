"""The tool router: one call attempt's budget, breaker, journal intent, sandbox and settlement."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
from agentkeel import AgentRequest, BudgetExceededError, Config, Principal, ToolError, tool
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.journal.base import StepRecord
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
from agentkeel.tools.breaker import BreakerBoard
from agentkeel.tools.decorator import spec_of
from agentkeel.tools.ratelimit import RateLimiterBoard
from agentkeel.tools.router import CallFailure, ToolRouter
from agentkeel.types import CostRecord, ToolSpec


class Recording:
    """A sandbox that records each call, with what the journal held when it ran."""

    strength = 0

    def __init__(self, journal: list[StepRecord], fail: ToolError | None = None) -> None:
        self.journal = journal
        self.fail = fail
        self.calls: list[tuple[ToolCall, int]] = []

    async def run(self, call: ToolCall) -> Any:
        self.calls.append((call, len(self.journal)))
        if self.fail is not None:
            raise self.fail
        return {"charged": call.args["amount"]}

    async def aclose(self) -> None:
        return None


@tool(permissions=["pay"], cost_usd=0.25)
def charge(amount: float, idempotency_key: str | None = None) -> dict[str, Any]:
    """Charge an amount (the sandbox above stands in for it)."""
    raise AssertionError("the test sandbox runs instead")


CHARGE = spec_of(charge)
assert CHARGE is not None


def make_run(budget_usd: float = 1.0) -> RunContext:
    config = Config.from_dict({}, "<test>")
    return RunContext(AgentRequest(message="pay", user_id="u", run_id="run-1"), Principal("u", frozenset({"pay"})),
                      config, Budget(budget_usd), Pricer(lambda model, config: None, config))


def router(sandbox: SandboxBackend, breakers: BreakerBoard | None = None, hook: Any = None) -> ToolRouter:
    return ToolRouter({"inprocess": sandbox}, breakers or BreakerBoard(), RateLimiterBoard(), hook)


async def call(r: ToolRouter, run: RunContext, journal: list[StepRecord], spec: ToolSpec = CHARGE,
               **kw: Any) -> Any:
    options: dict[str, Any] = {"step_id": 3, "kind": "forward", "attempt": 1, **kw}
    return await r.call(run, spec, {"amount": 5.0}, intent=journal.append, **options)


async def test_intent_first_then_the_call_with_its_key_then_settlement() -> None:
    journal: list[StepRecord] = []
    sandbox, run = Recording(journal), make_run()
    result = await call(router(sandbox), run, journal, kind="compensation", attempt=2)
    assert result == {"charged": 5.0}
    [intent] = journal
    assert (intent.step_id, intent.kind, intent.phase, intent.idempotency_key) == (3, "compensation", "intent",
                                                                                    "run-1:3")
    assert intent.args == {"amount": 5.0}  # the key is not an argument of the plan
    [(sent, journaled_before)] = sandbox.calls
    assert journaled_before == 1  # the intent was written before the tool could have any effect
    assert sent.args == {"amount": 5.0, "idempotency_key": "run-1:3"}
    assert (sent.run_id, sent.step_id, sent.kind, sent.attempt) == ("run-1", 3, "compensation", 2)
    assert run.costs == [CostRecord(kind="tool", cost_usd=0.25, tool="charge", step_id=3, purpose="tool",
                                    reason="tool")]
    assert run.budget.spent_usd == 0.25 and run.budget.reserved_usd == 0.0


async def test_a_failed_call_that_was_sent_is_billed() -> None:
    journal: list[StepRecord] = []
    sandbox, run = Recording(journal, ToolError("card declined", retryable=False)), make_run()
    with pytest.raises(CallFailure, match="card declined") as failed:
        await call(router(sandbox), run, journal)
    assert (failed.value.retryable, failed.value.sent) == (False, True)
    assert run.budget.spent_usd == 0.25 and len(run.costs) == 1
    transient = Recording(journal, ToolError("gateway timeout"))
    with pytest.raises(CallFailure) as again:
        await call(router(transient), make_run(), journal)
    assert (again.value.retryable, again.value.sent) == (True, True)


async def test_a_call_refused_by_the_open_breaker_is_not_sent_journaled_or_billed() -> None:
    journal: list[StepRecord] = []
    sandbox, run = Recording(journal), make_run()
    breakers = BreakerBoard(failure_threshold=1, reset_after_s=60.0, clock=lambda: 100.0)
    breakers.get("charge").record_failure(breakers.get("charge").admit())
    with pytest.raises(CallFailure, match="circuit") as refused:
        await call(router(sandbox, breakers), run, journal)
    assert refused.value.sent is False and refused.value.retryable is False
    assert sandbox.calls == [] and journal == []
    assert run.costs == [] and run.budget.spent_usd == 0.0 and run.budget.reserved_usd == 0.0


async def test_a_price_over_the_budget_propagates_before_anything_happens() -> None:
    journal: list[StepRecord] = []
    sandbox, run = Recording(journal), make_run(budget_usd=0.1)
    with pytest.raises(BudgetExceededError, match="tool charge"):
        await call(router(sandbox), run, journal)
    assert sandbox.calls == [] and journal == [] and run.costs == []


async def test_the_call_hook_gets_the_call_its_sandbox_and_the_run() -> None:
    journal: list[StepRecord] = []
    sandbox, run = Recording(journal), make_run()
    seen: list[tuple[ToolCall, SandboxBackend, RunContext]] = []

    def hook(c: ToolCall, box: SandboxBackend, r: RunContext) -> Awaitable[Any]:
        seen.append((c, box, r))
        return box.run(c)

    assert await call(router(sandbox, hook=hook), run, journal) == {"charged": 5.0}
    [(c, box, r)] = seen
    assert box is sandbox and r is run and c.spec.name == "charge" and c.kind == "forward"
    assert len(sandbox.calls) == 1
