"""Pydantic AI: ``Agent.run`` over its ``FunctionModel`` test model, scripted one tool call per turn.

The model function returns one ``ToolCallPart`` per turn, then a ``TextPart``
with the answer; the agent validates each call's arguments against the tool's
schema (pydantic-core, from the signature) and runs the tool. The request limit
is raised from its default (50) to fit K tool turns and the answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import scenario
from pydantic_ai import Agent
from pydantic_ai.agent import AgentRunResult
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import UsageLimits


def scripted_turns(k: int) -> list[ModelResponse]:
    """The model's K tool-call turns, then its answer."""
    turns = [
        ModelResponse(parts=[ToolCallPart(tool_name=c.tool, args=c.args, tool_call_id=c.call_id)])
        for c in scenario.script(k)
    ]
    return [*turns, ModelResponse(parts=[TextPart(scenario.FINAL_ANSWER)])]


class Script:
    """The ``FunctionModel`` function: replays the turns in order (async, so it runs on the event loop)."""

    def __init__(self, turns: list[ModelResponse]) -> None:
        self.turns = turns
        self.next: Iterator[ModelResponse] = iter(turns)

    def restart(self) -> None:
        self.next = iter(self.turns)

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return next(self.next)


class AgentSession:
    """One ``Agent.run`` per run."""

    def __init__(self, k: int) -> None:
        self.script = Script(scripted_turns(k))
        self.agent: Agent[None, str] = Agent(FunctionModel(self.script), tools=list(scenario.TOOLS))
        self.limits = UsageLimits(request_limit=k + 2)

    async def run(self) -> AgentRunResult[str]:
        self.script.restart()
        return await self.agent.run("bench", usage_limits=self.limits)

    def results(self, output: AgentRunResult[str]) -> list[Any]:
        if output.output != scenario.FINAL_ANSWER:
            raise scenario.BrokenRun(f"output is {output.output!r}")
        return [
            part.content
            for message in output.all_messages()
            for part in message.parts
            if isinstance(part, ToolReturnPart)
        ]


@asynccontextmanager
async def open_session(k: int) -> AsyncIterator[AgentSession]:
    """A Pydantic AI agent over a function model scripted for K steps."""
    yield AgentSession(k)
