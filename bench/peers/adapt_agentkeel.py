"""agentkeel, exactly as bench/overhead.py runs it: ScriptedPlanner, make_system, one K-step plan.

Every step takes the full production path (argument validation, permission
decision in the audit log, breaker, sandbox, evaluator, tool-call audit record);
the journal backend ("memory" or "sqlite") is chosen by the caller, with
AGENTKEEL_HOME pointing at a temporary directory for the run of the session.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import scenario
from agentkeel import AgentRequest, AgentResponse, AgentSystem, hookimpl, tool
from agentkeel.testing import ScriptedPlanner, make_system

TOOLS = [tool(idempotent=True, permissions=["bench"])(fn) for fn in scenario.TOOLS]


class BenchTools:
    """The plugin registering the scenario's tools."""

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in TOOLS:
            register(fn)


def wire(k: int) -> dict[str, Any]:
    """The K-step plan in the planner wire format."""
    return {
        "reasoning": "benchmark",
        "steps": [
            {"description": call.tool, "tool_name": call.tool, "tool_args": call.args} for call in scenario.script(k)
        ],
    }


class AgentkeelSession:
    """One ``AgentSystem.run`` per run: the scripted planner returns the whole plan, the runtime runs it."""

    def __init__(self, system: AgentSystem) -> None:
        self.system = system

    async def run(self) -> AgentResponse:
        return await self.system.run(AgentRequest(message="bench", user_id="bench"))

    def results(self, output: AgentResponse) -> list[Any]:
        if not output.ok:
            raise scenario.BrokenRun(f"run failed: {output.message}")
        return [step.result for step in output.steps]


@asynccontextmanager
async def open_session(k: int, journal: str) -> AsyncIterator[AgentkeelSession]:
    """An agentkeel system with the given journal backend, its home in a fresh temporary directory."""
    previous = os.environ.get("AGENTKEEL_HOME")
    with tempfile.TemporaryDirectory() as home:
        os.environ["AGENTKEEL_HOME"] = home
        try:
            system = make_system(
                BenchTools(), ScriptedPlanner(wire(k)), principals={"bench": ["bench"]},
                config={"journal": {"backend": journal}, "planner": {"max_steps": max(k, 1)}},
            )
            async with system:
                yield AgentkeelSession(system)
        finally:
            if previous is None:
                os.environ.pop("AGENTKEEL_HOME", None)
            else:
                os.environ["AGENTKEEL_HOME"] = previous
