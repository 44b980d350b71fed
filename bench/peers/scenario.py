"""The scenario every framework runs: K sequential calls of three trivial async tools.

Step ``n`` (0-based) calls ``noop``, ``lookup`` or ``add`` in turn, with arguments
derived from ``n``; the tools do no I/O, so a run's time is the framework's. A
framework's session runs the K steps once per ``run()`` and reports the tool
results it got back, which the harness compares with ``expected(k)``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

FINAL_ANSWER = "done"
"""What a scripted model says after its last tool call."""


async def noop(i: int) -> dict[str, Any]:
    """Return the step number it was given."""
    return {"i": i}


async def lookup(key: str) -> dict[str, Any]:
    """Return the key with its value (the key in upper case)."""
    return {"key": key, "value": key.upper()}


async def add(a: int, b: int) -> dict[str, Any]:
    """Return the sum of two integers."""
    return {"sum": a + b}


Tool = Callable[..., Awaitable[dict[str, Any]]]

TOOLS: tuple[Tool, ...] = (noop, lookup, add)

SCHEMAS: dict[str, dict[str, Any]] = {
    "noop": {
        "type": "object",
        "properties": {"i": {"type": "integer"}},
        "required": ["i"],
        "additionalProperties": False,
    },
    "lookup": {
        "type": "object",
        "properties": {"key": {"type": "string"}},
        "required": ["key"],
        "additionalProperties": False,
    },
    "add": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
"""The tools' argument schemas (JSON Schema 2020-12), for the bare loop."""


@dataclass(frozen=True)
class Call:
    """One planned tool call: the tool, its arguments and a call id unique in the run."""

    tool: str
    args: dict[str, Any]
    call_id: str


def script(k: int) -> list[Call]:
    """The K calls of a run, in order."""
    return [_call(n) for n in range(k)]


def _call(n: int) -> Call:
    call_id = f"call_{n}"
    match n % 3:
        case 0:
            return Call("noop", {"i": n}, call_id)
        case 1:
            return Call("lookup", {"key": f"k{n}"}, call_id)
        case _:
            return Call("add", {"a": n, "b": 1}, call_id)


def expected(k: int) -> list[dict[str, Any]]:
    """The tool results a correct run of K steps reports, in order."""
    return [_result(call) for call in script(k)]


def _result(call: Call) -> dict[str, Any]:
    match call.tool:
        case "noop":
            return {"i": call.args["i"]}
        case "lookup":
            return {"key": call.args["key"], "value": call.args["key"].upper()}
        case _:
            return {"sum": call.args["a"] + call.args["b"]}


class BrokenRun(Exception):
    """A run whose output is not that of a correct run (so its time means nothing)."""


class Session(Protocol):
    """One framework set up for runs of K steps (agent, tools and scripted model built once)."""

    async def run(self) -> Any:
        """Run the K steps once; return what the framework returned."""

    def results(self, output: Any) -> list[Any]:
        """The tool results in ``output``, in order; raise ``BrokenRun`` if the run did not finish."""
