"""Test kit for agentkeel and its plugin authors.

- ``OpenAIServer`` (``agentkeel.testing.server``): a scripted OpenAI-compatible
  HTTP server on loopback, with fault injection, so the real ``openai`` client is
  exercised over HTTP.
- ``ScriptedPlanner``: a planner plugin that returns a fixed wire-format plan.
- ``make_system``: an ``AgentSystem`` over chosen plugins with an inline config.
- pytest fixtures (loaded automatically): see ``agentkeel.testing.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import parse_plan
from agentkeel.testing.server import OpenAIServer
from agentkeel.types import Plan

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem


class ScriptedPlanner:
    """A planner plugin returning ``wire`` (the plan wire format) for every request.

    ``seen_tools`` records the tool names each call was shown.
    """

    def __init__(self, wire: Mapping[str, Any]) -> None:
        self.wire = wire
        self.seen_tools: list[list[str]] = []
        self._plan: Plan | None = None

    @hookimpl(tryfirst=True)
    def agentkeel_plan(self, tools: Mapping[str, Any]) -> Plan:
        self.seen_tools.append(sorted(tools))
        if self._plan is None:
            self._plan = parse_plan(self.wire, planner="scripted")
        return self._plan


def make_system(
    *plugins: object,
    principals: Mapping[str, Iterable[str]] | None = None,
    config: Mapping[str, Any] | None = None,
    load_entrypoints: bool = False,
) -> AgentSystem:
    """An ``AgentSystem`` with ``plugins`` registered after the defaults.

    ``principals`` maps a user id to its permissions; ``config`` adds any other
    configuration keys. Entry-point plugins are not loaded unless asked, so a
    test sees only the plugins it names.
    """
    from agentkeel.runtime.system import AgentSystem

    data: dict[str, Any] = dict(config or {})
    data.setdefault(
        "principals",
        {name: {"permissions": list(perms)} for name, perms in (principals or {"tester": []}).items()},
    )
    return AgentSystem(Config.from_dict(data, "<test>"), plugins=plugins, load_entrypoints=load_entrypoints)


__all__ = ["OpenAIServer", "ScriptedPlanner", "make_system"]
