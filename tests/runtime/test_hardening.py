"""Attacks on the per-step path that used to break it; each test failed before its fix.

- An in-process tool that runs past its timeout kept running and completed its
  effect after the step was reported failed (and compensated).
- A retry-safe tool that timed out overlapped its own retries.
- A tool returning something that is not JSON (a ``set``, NaN, a 100,000-deep
  list) raised out of the executor and left the run ``running``.
- NaN arguments passed ``maximum`` constraints.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl, tool
from agentkeel.config import Config
from agentkeel.errors import ToolSpecError
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing import ScriptedPlanner

EFFECTS: list[str] = []
UNDONE: list[str] = []
LIVE = {"now": 0, "peak": 0}
_LOCK = threading.Lock()


@tool(permissions=["t"], rollback="undo", timeout=0.1, allow_uncancellable=True)
def slow_pay(order: str) -> dict[str, Any]:
    """Sleeps past its timeout, then takes effect: the thread cannot be stopped."""
    time.sleep(0.4)
    EFFECTS.append(order)
    return {"order": order}


@tool(permissions=["t"], idempotent=True)
def undo(order: str) -> dict[str, Any]:
    UNDONE.append(order)
    return {"undone": order}


@tool(permissions=["t"], idempotent=True, timeout=0.1)
def slow_read(key: str) -> dict[str, Any]:
    """Retry-safe and slow: every attempt times out; attempts must never overlap."""
    with _LOCK:
        LIVE["now"] += 1
        LIVE["peak"] = max(LIVE["peak"], LIVE["now"])
    time.sleep(0.25)
    with _LOCK:
        LIVE["now"] -= 1
    return {"key": key}


@tool(permissions=["t"], rollback="undo", allow_uncancellable=True)
def odd_result(order: str, kind: str) -> Any:
    """Takes effect, then returns something JSON cannot carry."""
    EFFECTS.append(order)
    if kind == "set":
        return {"ids": {1, 2}}
    if kind == "nan":
        return {"total": math.nan}
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    return deep


@tool(permissions=["t"], allow_uncancellable=True)
def pay_amount(amount: float) -> dict[str, Any]:
    EFFECTS.append(f"paid {amount}")
    return {"paid": amount}


@tool(permissions=["t"], idempotent=True)
def total(order: str) -> dict[str, Any]:
    return {"amount": math.nan}


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (slow_pay, undo, slow_read, odd_result, pay_amount, total):
            register(fn)


def plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"reasoning": "test", "steps": list(steps)}


def step(tool_name: str, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": tool_name, "tool_name": tool_name, "tool_args": args, **extra}


def system_for(wire: dict[str, Any], *plugins: object, **config: Any) -> AgentSystem:
    data: dict[str, Any] = {"principals": {"agent": {"permissions": ["t"]}}, **config}
    return AgentSystem(Config.from_dict(data, "<test>"), plugins=plugins or (Tools(), ScriptedPlanner(wire)),
                       load_entrypoints=False)


@pytest.fixture(autouse=True)
def _reset() -> None:
    EFFECTS.clear()
    UNDONE.clear()
    LIVE.update(now=0, peak=0)


def request() -> AgentRequest:
    return AgentRequest(message="go", user_id="agent")


def test_a_timed_out_call_of_a_tool_that_is_not_retry_safe_is_in_doubt_not_failed_nor_compensated() -> None:
    with system_for(plan(step("slow_pay", {"order": "A"}), step("undo", {"order": "B"}))) as system:
        response = system.run_sync(request())
        assert response.status is RunStatus.IN_DOUBT
        first = response.steps[0]
        assert first.status is StepStatus.IN_DOUBT
        assert "timed out after 0.1s" in (first.error or "") and "--resolve 1=done" in response.message
        assert response.steps[1].status is StepStatus.PENDING or response.steps[1].status is StepStatus.SKIPPED
        time.sleep(0.5)
        assert EFFECTS == ["A"]  # the effect did happen after the step was given up...
        assert UNDONE == []  # ...and nothing was compensated blindly
        assert system.show(response.run_id).status is RunStatus.IN_DOUBT
        # Resume asks the same question as after a crash, and the human's answer is honoured.
        again = system.resume_sync(response.run_id)
        assert again.status is RunStatus.IN_DOUBT and EFFECTS == ["A"]
        done = system.resume_sync(response.run_id, resolve={1: True})
        assert done.status is RunStatus.SUCCEEDED, done.message
        assert EFFECTS == ["A"] and UNDONE == ["B"]


def test_a_retry_safe_tool_that_timed_out_never_overlaps_its_retry() -> None:
    with system_for(plan(step("slow_read", {"key": "k"}))) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert response.steps[0].attempts >= 2
    assert LIVE["peak"] == 1


def test_a_sync_tool_that_is_not_retry_safe_needs_an_opt_in_to_run_in_process() -> None:
    @tool(permissions=["t"])
    def send(to: str) -> str:
        return to

    class Plugin:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            register(send)

    with pytest.raises(ToolSpecError, match=r"'send' is a sync tool that is not retry-safe.*allow_uncancellable"):
        system_for(plan(), Plugin(), ScriptedPlanner(plan()))
    # Moving it to a sandbox that can stop it (in config) is enough.
    with system_for(plan(), Plugin(), ScriptedPlanner(plan()), tools={"send": {"isolation": "subprocess"}}) as ok:
        assert ok.tools["send"].isolation == "subprocess"


@pytest.mark.parametrize("kind", ["set", "nan", "deep"])
def test_a_result_that_is_not_json_fails_the_step_and_its_effect_is_compensated(kind: str) -> None:
    with system_for(plan(step("odd_result", {"order": "A", "kind": kind}),
                         step("undo", {"order": "never"}))) as system:
        response = system.run_sync(request())
        assert response.status is RunStatus.FAILED, response.message
        first = response.steps[0]
        assert first.status is StepStatus.COMPENSATED
        assert "the tool's result" in (first.error or "") and "not" in (first.error or "")
        assert EFFECTS == ["A"] and UNDONE == ["A"]  # the effect stood, so it was undone
        assert system.show(response.run_id).status is RunStatus.FAILED  # finished, not left running


def test_nan_from_a_reference_never_reaches_a_constrained_tool() -> None:
    wire = plan(step("total", {"order": "A"}),
                step("pay_amount", {"amount": {"$ref": "/1/amount"}}))
    principals = {"agent": {"permissions": ["t"], "constraints": {"pay_amount": {"amount": {"maximum": 100}}}}}
    with system_for(wire, principals=principals) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert "NaN is not a JSON number" in (response.steps[0].error or "")
    assert EFFECTS == []


def test_nan_in_a_planners_arguments_is_refused_naming_the_field() -> None:
    wire = plan(step("pay_amount", {"amount": math.nan}))
    principals = {"agent": {"permissions": ["t"], "constraints": {"pay_amount": {"amount": {"maximum": 100}}}}}
    with system_for(wire, principals=principals) as system:
        response = system.run_sync(request())
    assert response.status is not RunStatus.SUCCEEDED
    assert "amount" in response.message and "NaN" in response.message
    assert EFFECTS == []
