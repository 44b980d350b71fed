"""The default plan check, run before any step executes.

Every step must name a tool the principal may call; references and conditions
may only point at earlier steps; arguments without references must already
validate against the tool's schema (arguments with references are validated
again once the references resolve, at step time).
"""

from __future__ import annotations

from collections.abc import Mapping

from agentkeel.markers import hookimpl
from agentkeel.types import Plan, Principal, ToolSpec
from agentkeel.validation import args_errors


@hookimpl(trylast=True)
def agentkeel_check_plan(plan: Plan, tools: Mapping[str, ToolSpec], principal: Principal) -> list[str]:
    problems: list[str] = []
    for index, step in enumerate(plan.steps, start=1):
        where = f"step {step.step_id} ({step.tool_name})"
        if step.step_id != index:
            problems.append(f"{where}: steps must be numbered 1, 2, 3... in order")
        later = sorted(d for d in step.depends_on if d >= step.step_id)
        if later:
            problems.append(f"{where}: refers to step(s) {later}; a step may only refer to earlier steps")
        spec = tools.get(step.tool_name)
        if spec is None:
            problems.append(f"{where}: no tool {step.tool_name!r} is available to {principal.name!r}")
            continue
        if not _has_refs(step.tool_args):
            problems.extend(f"{where}: {e}" for e in args_errors(spec, step.tool_args))
    return problems


def _has_refs(value: object) -> bool:
    if isinstance(value, Mapping):
        return "$ref" in value or any(_has_refs(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_refs(v) for v in value)
    return False
