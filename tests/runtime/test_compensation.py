"""Compensation: argument building, and the same guarantees as forward calls."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, ToolError, hookimpl, tool
from agentkeel.config import Config
from agentkeel.runtime.compensation import compensation_args
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import ScriptedPlanner
from agentkeel.tools.decorator import spec_of

LEDGER: list[str] = []
UNDO_FAILS = {"n": 0, "retryable": True}


@tool(permissions=["t"], rollback="unbook")
def book(item: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Book an item."""
    LEDGER.append(item)
    return {"booking": f"b-{item}", "item": "ignored: arguments win"}


@tool(permissions=["t"], idempotent=True)
def unbook(item: str, booking: str) -> dict[str, Any]:
    """Cancel a booking; fails as scripted."""
    if UNDO_FAILS["n"] > 0:
        UNDO_FAILS["n"] -= 1
        raise ToolError("unbook is down", retryable=bool(UNDO_FAILS["retryable"]))
    LEDGER.remove(item)
    return {"cancelled": booking}


@tool(permissions=["t"], allow_uncancellable=True)
def refuse() -> None:
    """Always refuses."""
    raise ToolError("refused", retryable=False)


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (book, unbook, refuse):
            register(fn)


@pytest.fixture(autouse=True)
def _reset() -> Generator[None, None, None]:
    LEDGER.clear()
    UNDO_FAILS.update(n=0, retryable=True)
    yield


def test_compensator_arguments_merge_result_and_arguments_and_keep_declared_ones() -> None:
    spec = spec_of(unbook)
    assert spec is not None
    args = compensation_args(spec, {"item": "x", "idempotency_key": "k"}, {"booking": "b-x", "extra": 1})
    assert args == {"item": "x", "booking": "b-x"}


def run(**config: Any) -> Any:
    data = {"principals": {"u": {"permissions": ["t"]}}, "retry": {"base_delay_s": 0.0}, **config}
    wire = {"reasoning": "", "steps": [
        {"description": "book", "tool_name": "book", "tool_args": {"item": "seat"}},
        {"description": "refuse", "tool_name": "refuse", "tool_args": {}},
    ]}
    with AgentSystem(Config.from_dict(data, "<t>"), plugins=(Tools(), ScriptedPlanner(wire)),
                     load_entrypoints=False) as system:
        response = system.run_sync(AgentRequest(message="m", user_id="u"))
        return response, system.journal.load(response.run_id)


def test_abort_compensates_and_the_compensator_is_retried_by_recovery() -> None:
    UNDO_FAILS["n"] = 2
    response, state = run()
    assert response.status is RunStatus.FAILED and LEDGER == []
    assert response.steps[0].status is StepStatus.COMPENSATED
    undo = state.compensation(1)[1]
    assert undo is not None and undo.attempts == 3 and undo.args == {"item": "seat", "booking": "b-seat"}
    assert "rolled back step(s) 1" in response.message


def test_a_compensation_that_cannot_run_is_reported_and_the_effect_named() -> None:
    UNDO_FAILS.update(n=10, retryable=False)
    response, state = run()
    assert response.status is RunStatus.FAILED and LEDGER == ["seat"]
    assert response.steps[0].status is StepStatus.SUCCEEDED
    assert "rollback incomplete" in response.message and "unbook" in response.message
    assert state.compensation(1)[1] is not None


def test_compensating_calls_pass_the_breaker() -> None:
    UNDO_FAILS["n"] = 100
    response, _ = run(breaker={"failure_threshold": 1, "reset_after_s": 60}, retry={"max_attempts": 3,
                                                                                  "base_delay_s": 0.0})
    assert response.status is RunStatus.FAILED and LEDGER == ["seat"]
    assert "circuit breaker" in response.message
