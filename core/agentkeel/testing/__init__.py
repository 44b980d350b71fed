"""Test kit for agentkeel and its plugin authors.

- ``OpenAIServer`` (``agentkeel.testing.server``): a scripted OpenAI-compatible
  HTTP server on loopback, with fault injection, so the real ``openai`` client is
  exercised over HTTP.
- ``ScriptedPlanner``: a planner plugin that returns a fixed wire-format plan.
- ``make_system``: an ``AgentSystem`` over chosen plugins with an inline config.
- pytest fixtures (loaded automatically): see ``agentkeel.testing.pytest_plugin``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import parse_plan
from agentkeel.testing.server import OpenAIServer
from agentkeel.types import Plan, Progress

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem


class ScriptedPlanner:
    """A planner plugin returning ``wire`` (the plan wire format) for every request.

    ``later`` scripts the revisions after the first (replans and rounds): the
    n-th call with a ``progress`` returns ``later[n-1]``, numbered from
    ``progress.next_step_id`` (so ``{"$ref": "/1/..."}`` still means the run's
    step 1), or abstains once ``later`` is used up. ``seen_tools`` records the
    tool names each call was shown, ``progress`` what each later call was told.
    """

    def __init__(self, wire: Mapping[str, Any], later: Sequence[Mapping[str, Any]] = ()) -> None:
        self.wire = wire
        self.later = list(later)
        self.seen_tools: list[list[str]] = []
        self.progress: list[Progress] = []
        self._plan: Plan | None = None

    @hookimpl(tryfirst=True)
    def agentkeel_plan(self, tools: Mapping[str, Any], progress: Progress | None = None) -> Plan | None:
        self.seen_tools.append(sorted(tools))
        if progress is not None:
            self.progress.append(progress)
            if len(self.progress) > len(self.later):
                return None
            return parse_plan(self.later[len(self.progress) - 1], planner="scripted",
                              first_step_id=progress.next_step_id)
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
