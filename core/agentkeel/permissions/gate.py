"""The permissions gate's rules that hold whatever plugins decide.

``combine_decisions``: a call is allowed only when at least one
``agentkeel_authorize`` implementation allows it and none denies it (deny by
default); a pending approval (``wait=True``) pauses rather than denies.
``visible_tools``: the tools a principal may call, the only ones a planner sees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agentkeel.types import Decision, Principal, ToolSpec

NOBODY_ALLOWED = Decision(False, "no permissions plugin allowed the call (deny by default)")

Authorize = Callable[[Principal, ToolSpec, "Mapping[str, Any] | None"], Decision]


def combine_decisions(decisions: Iterable[Decision]) -> Decision:
    allowed: Decision | None = None
    waiting: Decision | None = None
    for decision in decisions:
        if decision.allowed:
            allowed = allowed or decision
        elif decision.wait:
            waiting = waiting or decision
        else:
            return decision
    if waiting is not None:
        return waiting
    return allowed or NOBODY_ALLOWED


def visible_tools(principal: Principal, tools: Mapping[str, ToolSpec], authorize: Authorize) -> dict[str, ToolSpec]:
    """The tools ``principal`` may call (the tool-level decision, without arguments)."""
    return {name: spec for name, spec in tools.items() if authorize(principal, spec, None).allowed}
