"""The plan check the host always runs before any step executes.

Plugins add their own checks through ``agentkeel_check_plan``; these are the
invariants the executor relies on, so they are not a plugin that could be
disabled: every step names a registered tool, steps are numbered in order,
references and conditions point only at earlier steps, and arguments without
references already validate against the tool's schema (arguments with
references are validated once they resolve, at step time).
"""

from __future__ import annotations

from collections.abc import Mapping

from agentkeel.tools.validation import args_errors
from agentkeel.types import Plan, ToolSpec


def plan_problems(plan: Plan, tools: Mapping[str, ToolSpec]) -> list[str]:
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
            problems.append(f"{where}: no tool {step.tool_name!r} is registered")
            continue
        if not step.arg_refs:
            problems.extend(f"{where}: {e}" for e in args_errors(spec, step.tool_args))
    return problems
