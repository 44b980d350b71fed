"""The rule planner: plan templates contributed by plugins, tried before any LLM.

A template that matches the whole message yields a plan for free; when none
matches, the next planner (the LLM planner by default) is asked.

Matching time is bounded twice: each template's pattern runs on RE2, in time
linear in the message's length (``PlanTemplate``), and a message longer than
``TEMPLATE_MAX_CHARS`` is not offered to the templates at all (they are written
for short requests; the next planner is asked), so the templates together cost
at most a few tens of milliseconds, whatever the message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agentkeel.context import RunContext
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import PlanTemplate, parse_plan
from agentkeel.types import AgentRequest, Plan, Progress, ToolSpec

TEMPLATE_MAX_CHARS = 256 * 1024
"""The longest message (in characters) the templates are matched against."""


@hookimpl(tryfirst=True)
def agentkeel_plan(
    request: AgentRequest, run: RunContext, templates: Sequence[PlanTemplate], progress: Progress | None = None
) -> Plan | None:
    if len(request.message) > TEMPLATE_MAX_CHARS:
        return None
    if progress is not None:
        return _replan(request, run, templates, progress)
    registry = run.tools
    for template in templates:
        wire = template.match(request.message)
        if wire is None:
            continue
        if any(step.get("tool_name") not in registry for step in wire["steps"]):
            continue  # a tool this template needs is not installed
        # Templates are fixed text, not model output: a step naming a tool the
        # principal may not call is kept, so the request is denied (and audited)
        # rather than sent to another planner.
        return _plan(wire, registry, f"rules:{template.name or template.pattern}", 1)
    return None


def _replan(
    request: AgentRequest, run: RunContext, templates: Sequence[PlanTemplate], progress: Progress
) -> Plan | None:
    """A template's ``replan`` steps, once, when the plan that failed was that template's
    first plan (rule templates are single-round: they never plan a round)."""
    if progress.reason != "replan" or len(progress.plans) != 1:
        return None
    planner = progress.plans[0].planner
    for template in templates:
        if f"rules:{template.name or template.pattern}" != planner:
            continue
        wire = template.match_replan(request.message)
        if wire is None or any(step.get("tool_name") not in run.tools for step in wire["steps"]):
            return None
        if progress.next_step_id != len(template.steps) + 1:
            return None  # not the template's own first plan: its numbering would not hold
        return _plan(wire, run.tools, f"{planner}:replan", progress.next_step_id)
    return None


def _plan(wire: dict[str, Any], registry: Mapping[str, ToolSpec], planner: str, first: int) -> Plan:
    answer = wire.pop("answer_template", None)
    for step in wire["steps"]:
        _coerce_args(step, registry[step["tool_name"]])
    return parse_plan(wire, planner=planner, first_step_id=first, answer_template=answer)


def _coerce_args(step: dict[str, Any], spec: ToolSpec) -> None:
    """Captured text becomes a number where the tool's schema asks for one."""
    properties = spec.args_schema.get("properties", {})
    args = step.get("tool_args", {})
    for name, value in args.items():
        if not isinstance(value, str):
            continue
        kind = properties.get(name, {}).get("type")
        try:
            if kind == "integer":
                args[name] = int(value)
            elif kind == "number":
                args[name] = float(value)
        except ValueError:
            pass  # left as text: the plan check reports the argument by name
