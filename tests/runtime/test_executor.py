"""The per-step path: retries only when retry-safe, fallbacks, conditions, references, budget."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, ToolError, hookimpl, tool
from agentkeel.config import Config
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import ScriptedPlanner

CALLS: list[str] = []
FAILS: dict[str, int] = {}


def _maybe_fail(name: str) -> None:
    CALLS.append(name)
    if FAILS.get(name, 0) > 0:
        FAILS[name] -= 1
        raise ToolError(f"{name} is flaky", retryable=True)


@tool(permissions=["t"], idempotent=True)
def flaky_read(key: str) -> dict[str, Any]:
    """Idempotent, transiently failing."""
    _maybe_fail("flaky_read")
    return {"key": key, "status": "shipped", "total": 12.5}


@tool(permissions=["t"], fallback="backup", allow_uncancellable=True)
def once_only(key: str) -> dict[str, Any]:
    """Not retry-safe; has a fallback."""
    _maybe_fail("once_only")
    return {"done": key}


@tool(permissions=["t"], idempotent=True)
def backup(key: str) -> dict[str, Any]:
    """The fallback."""
    CALLS.append("backup")
    return {"backup": key}


@tool(permissions=["t"], cost_usd=0.4, allow_uncancellable=True)
def priced(key: str) -> dict[str, Any]:
    """Costs money per call."""
    CALLS.append("priced")
    return {"paid": key}


@tool(permissions=["t"], allow_uncancellable=True)
def takes_amount(amount: float) -> float:
    """Reads an earlier result through a reference."""
    CALLS.append("takes_amount")
    return amount


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (flaky_read, once_only, backup, priced, takes_amount):
            register(fn)


@pytest.fixture(autouse=True)
def _reset() -> Generator[None, None, None]:
    CALLS.clear()
    FAILS.clear()
    yield


def run(steps: list[dict[str, Any]], budget: float | None = None) -> Any:
    config = Config.from_dict({"principals": {"u": {"permissions": ["t"]}}, "retry": {"base_delay_s": 0.0}}, "<t>")
    wire = {"reasoning": "", "steps": [{"description": s["tool_name"], "tool_args": {}, **s} for s in steps]}
    with AgentSystem(config, plugins=(Tools(), ScriptedPlanner(wire)), load_entrypoints=False) as system:
        return system.run_sync(AgentRequest(message="m", user_id="u", budget_usd=budget))


def test_idempotent_tool_is_retried_after_a_transient_failure() -> None:
    FAILS["flaky_read"] = 2
    response = run([{"tool_name": "flaky_read", "tool_args": {"key": "a"}}])
    assert response.ok and response.steps[0].attempts == 3
    assert CALLS == ["flaky_read"] * 3


def test_tool_that_is_not_retry_safe_is_never_retried_and_falls_back() -> None:
    FAILS["once_only"] = 5
    response = run([{"tool_name": "once_only", "tool_args": {"key": "a"}}])
    assert response.ok, response.message
    assert CALLS == ["once_only", "backup"]
    assert response.steps[0].tool_name == "backup" and response.steps[0].result == {"backup": "a"}


def test_condition_false_skips_and_dependents_skip_too() -> None:
    response = run([
        {"tool_name": "flaky_read", "tool_args": {"key": "a"}},
        {"tool_name": "takes_amount", "tool_args": {"amount": {"$ref": "/1/total"}},
         "when": {"ref": "/1/status", "op": "eq", "value": "pending"}},
        {"tool_name": "takes_amount", "tool_args": {"amount": {"$ref": "/2"}}},
    ])
    assert response.ok
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED, StepStatus.SKIPPED, StepStatus.SKIPPED]
    assert CALLS == ["flaky_read"]


def test_reference_is_resolved_and_validated_at_step_time() -> None:
    response = run([
        {"tool_name": "flaky_read", "tool_args": {"key": "a"}},
        {"tool_name": "takes_amount", "tool_args": {"amount": {"$ref": "/1/total"}}},
        {"tool_name": "takes_amount", "tool_args": {"amount": {"$ref": "/1/status"}}},
    ])
    assert response.status is RunStatus.FAILED
    assert response.steps[1].result == 12.5
    assert response.steps[2].status is StepStatus.FAILED and "amount" in (response.steps[2].error or "")


def test_missing_reference_fails_the_step_without_calling_the_tool() -> None:
    response = run([
        {"tool_name": "flaky_read", "tool_args": {"key": "a"}},
        {"tool_name": "takes_amount", "tool_args": {"amount": {"$ref": "/1/nothing"}}},
    ])
    assert response.status is RunStatus.FAILED and "nothing" in (response.steps[1].error or "")
    assert CALLS == ["flaky_read"]


def test_a_tool_price_that_does_not_fit_exhausts_the_budget_before_the_call() -> None:
    response = run([{"tool_name": "priced", "tool_args": {"key": "a"}},
                    {"tool_name": "priced", "tool_args": {"key": "b"}}], budget=0.5)
    assert response.status is RunStatus.REJECTED  # the plan check sees the estimate first
    response = run([{"tool_name": "priced", "tool_args": {"key": "a"}}], budget=0.5)
    assert response.ok and response.total_cost_usd == pytest.approx(0.4)
    assert [c.tool for c in response.costs] == ["priced"]
