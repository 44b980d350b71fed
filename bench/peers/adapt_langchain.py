"""LangChain (langchain-core): a tool-calling loop over a fake chat model and the framework's tools.

The model is langchain-core's own ``FakeMessagesListChatModel``, scripted with one
``AIMessage(tool_calls=[...])`` per step and then the final answer. Each step the
loop invokes the model with the conversation so far and runs the requested tool
with ``BaseTool.ainvoke(tool_call)``, which validates the arguments against the
tool's pydantic schema and returns a ``ToolMessage``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

# No LangSmith tracing, whatever the environment says (the _V2 variable is read first): nothing leaves the process.
os.environ.update(LANGSMITH_TRACING_V2="false", LANGSMITH_TRACING="false")

import scenario
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool, tool
from langchain_core.utils.function_calling import convert_to_openai_tool


class ScriptedChatModel(FakeMessagesListChatModel):
    """``FakeMessagesListChatModel`` that answers on the event loop and accepts tools as a chat model does.

    The base class generates synchronously, so its async path would hop to a
    thread per turn; a real chat model's async client does not, so ``_agenerate``
    answers inline. ``bind_tools`` binds the tools' OpenAI schemas as real chat
    models do (the script ignores them).
    """

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop, **kwargs)

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)


def scripted_model(k: int) -> ScriptedChatModel:
    """A model that asks for the K calls one per turn, then answers; it cycles, so it restarts each run."""
    turns: list[BaseMessage] = [
        AIMessage(content="", tool_calls=[{"name": c.tool, "args": c.args, "id": c.call_id, "type": "tool_call"}])
        for c in scenario.script(k)
    ]
    return ScriptedChatModel(responses=[*turns, AIMessage(content=scenario.FINAL_ANSWER)])


def lc_tools() -> list[BaseTool]:
    """The scenario's tools as LangChain tools (schemas from the signatures)."""
    return [tool(fn) for fn in scenario.TOOLS]


def tool_results(messages: Sequence[BaseMessage]) -> list[Any]:
    """The tool results in a finished conversation; raise ``BrokenRun`` if it has no final answer."""
    last = messages[-1]
    if not isinstance(last, AIMessage) or last.tool_calls or last.content != scenario.FINAL_ANSWER:
        raise scenario.BrokenRun(f"no final answer, last message: {last!r}")
    return [json.loads(str(m.content)) for m in messages if isinstance(m, ToolMessage)]


class ToolCallingLoop:
    """The agent loop: model turn, then the tools it asked for, until it answers without tool calls."""

    def __init__(self, k: int) -> None:
        self.model = scripted_model(k)
        self.tools = {t.name: t for t in lc_tools()}
        self.bound = self.model.bind_tools(list(self.tools.values()))

    async def run(self) -> list[BaseMessage]:
        self.model.i = 0
        messages: list[BaseMessage] = [HumanMessage("bench")]
        while True:
            reply = await self.bound.ainvoke(messages)
            messages.append(reply)
            if not isinstance(reply, AIMessage) or not reply.tool_calls:
                return messages
            for call in reply.tool_calls:
                messages.append(await self.tools[call["name"]].ainvoke(call))

    def results(self, output: list[BaseMessage]) -> list[Any]:
        return tool_results(output)


@asynccontextmanager
async def open_session(k: int) -> AsyncIterator[ToolCallingLoop]:
    """The tool-calling loop over a model scripted for K steps."""
    yield ToolCallingLoop(k)
