"""LangGraph: a prebuilt ReAct agent graph over the scripted fake chat model.

Two builders of the same kind of graph: LangGraph's ``create_react_agent``
(langgraph.prebuilt, deprecated since LangGraph 1.0) and its successor,
``create_agent`` of the ``langchain`` package. Either graph alternates a model
node and a tool node (which validates each call's arguments against the tool's
schema and runs it) until the model answers without tool calls. The model is
the LangChain row's ``ScriptedChatModel``.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from adapt_langchain import ScriptedChatModel, lc_tools, scripted_model, tool_results
from langchain_core.messages import BaseMessage
from langchain_core.tools import BaseTool
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import create_react_agent

Builder = Callable[[ScriptedChatModel, list[BaseTool]], CompiledStateGraph[Any]]


def react_agent(model: ScriptedChatModel, tools: list[BaseTool]) -> CompiledStateGraph[Any]:
    """LangGraph's prebuilt ``create_react_agent``, its deprecation warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_react_agent(model, tools)


def langchain_agent(model: ScriptedChatModel, tools: list[BaseTool]) -> CompiledStateGraph[Any]:
    """``langchain.agents.create_agent``, no middleware."""
    from langchain.agents import create_agent

    graph: CompiledStateGraph[Any] = create_agent(model, tools)
    return graph


BUILDERS: dict[str, Builder] = {"create_react_agent": react_agent, "create_agent": langchain_agent}


class GraphAgent:
    """One ``ainvoke`` of the compiled graph per run, its recursion limit raised to fit K steps."""

    def __init__(self, k: int, build: Builder) -> None:
        self.model = scripted_model(k)
        self.graph = build(self.model, lc_tools())
        self.config: Any = {"recursion_limit": 2 * k + 10}

    async def run(self) -> list[BaseMessage]:
        self.model.i = 0
        state = await self.graph.ainvoke({"messages": [("user", "bench")]}, config=self.config)
        messages: list[BaseMessage] = state["messages"]
        return messages

    def results(self, output: list[BaseMessage]) -> list[Any]:
        return tool_results(output)


@asynccontextmanager
async def open_session(k: int, builder: str) -> AsyncIterator[GraphAgent]:
    """The agent graph built by ``builder`` (a key of ``BUILDERS``) over a model scripted for K steps."""
    yield GraphAgent(k, BUILDERS[builder])
