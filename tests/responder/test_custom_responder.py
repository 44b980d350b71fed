"""The README's custom responder: it answers succeeded runs and leaves the rest to the defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agentkeel import AgentRequest, Answer, RunStatus, StepResult, hookimpl, tool
from agentkeel.errors import ToolError
from agentkeel.testing import ScriptedPlanner, make_system


@tool(permissions=["x"], idempotent=True)
def ping(n: int) -> dict[str, Any]:
    """Ping."""
    if n < 0:
        raise ToolError("negative", retryable=False)
    return {"pong": n}


class Mine:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(ping)

    @hookimpl
    def agentkeel_respond(self, request: AgentRequest, status: RunStatus, steps: Sequence[StepResult]) -> Answer | None:
        if status is not RunStatus.SUCCEEDED:
            return None
        done = ", ".join(s.tool_name for s in steps)
        return Answer(f"Done ({done}).", source="mine")


def run(n: int) -> Any:
    wire = {"reasoning": "", "steps": [{"description": "", "tool_name": "ping", "tool_args": {"n": n}}]}
    with make_system(Mine(), ScriptedPlanner(wire), principals={"u": ["x"]},
                     config={"recovery": {"max_replans": 0}}) as system:
        return system.run_sync(AgentRequest(message="ping", user_id="u"))


def test_a_plugin_responder_answers_first() -> None:
    response = run(1)
    assert (response.answer, response.answer_source) == ("Done (ping).", "mine")


def test_a_plugin_responder_that_abstains_leaves_the_answer_to_the_defaults() -> None:
    response = run(-1)
    assert response.status is RunStatus.FAILED and response.answer_source == "template"
    assert response.answer.startswith("I could not complete your request: step 1 (ping) failed: negative")
