"""OpenAI Agents SDK (``agents``): ``Runner.run`` over a scripted implementation of the SDK's ``Model``.

As the SDK's own tests do with their fake model, the scripted model returns one
``function_call`` output item per turn (the arguments as the JSON string a model
sends), then an assistant message; the runner validates each call's arguments
against the ``function_tool``'s pydantic schema and runs it. Tracing is disabled.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import scenario
from agents import (
    Agent,
    AgentOutputSchemaBase,
    Handoff,
    Model,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    Runner,
    RunResult,
    Tool,
    ToolCallOutputItem,
    TResponseInputItem,
    Usage,
    function_tool,
    set_tracing_disabled,
)
from openai.types.responses import ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText


def scripted_turns(k: int) -> list[ModelResponse]:
    """The model's K tool-call turns, then its final message."""
    turns = [
        ModelResponse(
            output=[ResponseFunctionToolCall(
                type="function_call", name=c.tool, arguments=json.dumps(c.args), call_id=c.call_id, id=c.call_id,
            )],
            usage=Usage(),
            response_id=None,
        )
        for c in scenario.script(k)
    ]
    final = ResponseOutputMessage(
        id="final", type="message", role="assistant", status="completed",
        content=[ResponseOutputText(type="output_text", text=scenario.FINAL_ANSWER, annotations=[])],
    )
    return [*turns, ModelResponse(output=[final], usage=Usage(), response_id=None)]


class ScriptedModel(Model):
    """A ``Model`` that replays the scripted turns in order; ``restart`` rewinds it for the next run."""

    def __init__(self, turns: list[ModelResponse]) -> None:
        self.turns = turns
        self.next: Iterator[ModelResponse] = iter(turns)

    def restart(self) -> None:
        self.next = iter(self.turns)

    async def get_response(
        self,
        system_instructions: str | None,
        input: str | list[TResponseInputItem],
        model_settings: ModelSettings,
        tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None,
        handoffs: list[Handoff],
        tracing: ModelTracing,
        **kwargs: Any,
    ) -> ModelResponse:
        return next(self.next)

    def stream_response(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("the benchmark does not stream")


class RunnerSession:
    """One ``Runner.run`` of the agent per run, ``max_turns`` fitting K tool turns and the answer."""

    def __init__(self, k: int) -> None:
        self.model = ScriptedModel(scripted_turns(k))
        self.agent: Agent[None] = Agent(
            name="bench", model=self.model, tools=[function_tool(fn) for fn in scenario.TOOLS],
        )
        self.max_turns = k + 2

    async def run(self) -> RunResult:
        self.model.restart()
        return await Runner.run(self.agent, "bench", max_turns=self.max_turns)

    def results(self, output: RunResult) -> list[Any]:
        if output.final_output != scenario.FINAL_ANSWER:
            raise scenario.BrokenRun(f"final output is {output.final_output!r}")
        return [item.output for item in output.new_items if isinstance(item, ToolCallOutputItem)]


@asynccontextmanager
async def open_session(k: int) -> AsyncIterator[RunnerSession]:
    """The SDK's runner over a model scripted for K steps, tracing disabled."""
    set_tracing_disabled(True)
    yield RunnerSession(k)
