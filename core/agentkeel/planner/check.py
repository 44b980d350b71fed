"""The plan check the host always runs before any step executes.

Plugins add their own checks through ``agentkeel_check_plan``; these are the
invariants the executor relies on, so they are not a plugin that could be
disabled: the plan has at most ``max_steps`` steps (``[planner] max_steps``,
default 50), every step names a registered tool, steps are numbered in order,
references and conditions point only at earlier steps, arguments, conditions
and ``expect`` schemas are JSON values (no NaN or Infinity, which pass every
``maximum``; bounded nesting; no lone surrogates), and arguments without
references already validate against the tool's schema (arguments with
references are validated once they resolve, at step time).

These hold whichever planner produced the plan: rules, the LLM, a plugin.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import agentkeel.jsonvalue as jsonvalue
from agentkeel.config import DEFAULT_MAX_STEPS
from agentkeel.tools.validation import args_errors
from agentkeel.types import Plan, ToolSpec


def plan_problems(
    plan: Plan,
    tools: Mapping[str, ToolSpec],
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    first_step_id: int = 1,
    earlier_results: Collection[int] = (),
) -> list[str]:
    """Every way ``plan`` breaks the host's invariants (empty: it may run).

    ``max_steps`` is ``config.max_steps``. A plan longer than that is refused
    with that one reason, before its steps are looked at. A later revision of a
    run's plan is numbered from ``first_step_id`` and may refer only to its own
    earlier steps and to ``earlier_results``: the earlier steps that succeeded.
    """
    if len(plan.steps) > max_steps:
        return [
            f"the plan has {len(plan.steps)} steps, more than the {max_steps} allowed "
            f"([planner] max_steps in agentkeel.toml); planner {plan.planner or '(unnamed)'!r} must plan fewer steps"
        ]
    problems: list[str] = []
    reasoning = jsonvalue.text_problem(str(plan.reasoning), "the plan's reasoning")
    if reasoning:
        problems.append(reasoning)
    for index, step in enumerate(plan.steps, start=first_step_id):
        where = f"step {step.step_id} ({step.tool_name})"
        if step.step_id != index:
            problems.append(f"{where}: steps must be numbered {first_step_id}, {first_step_id + 1}... in order")
        if step.depends_on:
            later = sorted(d for d in step.depends_on if d >= step.step_id)
            if later:
                problems.append(f"{where}: refers to step(s) {later}; a step may only refer to earlier steps")
            gone = sorted(d for d in step.depends_on if d < first_step_id and d not in earlier_results)
            if gone:
                problems.append(f"{where}: refers to step(s) {gone} of an earlier plan, which have no result "
                                "(they failed, were skipped or do not exist)")
        not_json = _json_problems(step.tool_args, step.when, step.expect, step.description)
        problems.extend(f"{where}: {p}" for p in not_json)
        spec = tools.get(step.tool_name)
        if spec is None:
            problems.append(f"{where}: no tool {step.tool_name!r} is registered")
            continue
        if not step.arg_refs and not not_json:
            problems.extend(f"{where}: {e}" for e in args_errors(spec, step.tool_args))
    return problems


def _json_problems(args: object, when: object, expect: object, description: object) -> list[str]:
    out = []
    # (value, what a field inside it is called, what the whole is called)
    for value, field, whole in ((args, "argument", "arguments"), (when, "condition", "condition"),
                                (expect, "expect", "expect")):
        if value is None:
            continue
        bad = jsonvalue.problem(value)
        if bad is not None:
            path, _, why = bad.partition(": ")
            out.append(f"{field} {path}: {why}" if path else f"{whole}: {why}")
    if isinstance(description, str):
        text = jsonvalue.text_problem(description, "description")
        if text:
            out.append(text)
    return out
