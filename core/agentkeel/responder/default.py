"""The deterministic responder: answers written without a model (``trylast``).

- A run that succeeded (or ended ``degraded``) answers with the plan's own
  answer (a planner's final answer), else its answer template rendered from the
  step results (``"Order {1.order_id} is {1.status}."``; a list of
  ``{"when", "text"}`` choices takes the first whose condition holds and whose
  placeholders all resolve), else the facts the steps returned. A degraded run
  then says plainly which optional steps could not be done.
- Any other run answers with what happened, what was undone (and what stays),
  and what the user can do next.

Placeholders are ``{N.field.sub}`` (step N's result; ``{N}`` is the whole
result) with an optional format spec (``{1.total:.2f}``). Values are rendered
as short single-line text (``agentkeel.facts.value_text``): tool output is
data, and nothing in it is interpreted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from agentkeel.facts import facts, value_text
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import RefError, evaluate_condition
from agentkeel.types import AgentRequest, Answer, AnswerTemplate, Plan, RunStatus, StepResult, StepStatus

_PLACEHOLDER = re.compile(r"\{([1-9][0-9]*)((?:\.[^.{}:]+)*)(?::([^{}]*))?\}")
# Format specs a template may use on numbers: no fill character, widths below 100.
_SPEC = re.compile(r"[<>^=]?[+\- ]?#?0?[0-9]{0,2}[,_]?(?:\.[0-9]{1,2})?[eEfFgGdn%]?")


class _Missing(LookupError):
    pass


def render(template: str, results: Mapping[int, Any]) -> str:
    """``template`` with every ``{N.path[:spec]}`` replaced; ``_Missing`` when one does not resolve."""

    def value(m: re.Match[str]) -> str:
        step_id = int(m.group(1))
        if step_id not in results:
            raise _Missing(f"step {step_id} has no result")
        node = results[step_id]
        for token in (m.group(2) or "").split(".")[1:]:
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise _Missing(f"no {token!r} in the result of step {step_id}")
        spec = m.group(3)
        if spec and _SPEC.fullmatch(spec) and isinstance(node, (int, float)) and not isinstance(node, bool):
            try:
                return format(node, spec)
            except ValueError:
                pass
        return value_text(node)

    return _PLACEHOLDER.sub(value, template)


def render_answer(template: AnswerTemplate, results: Mapping[int, Any]) -> str | None:
    """The rendered answer template, or None when no choice applies."""
    choices: list[Mapping[str, Any]] = [{"text": template}] if isinstance(template, str) else list(template)
    for choice in choices:
        when = choice.get("when")
        try:
            if when is not None and not evaluate_condition(when, results):
                continue
            return render(str(choice["text"]), results)
        except (RefError, _Missing):
            continue
    return None


def _step(s: StepResult) -> str:
    return f"step {s.step_id} ({s.tool_name})"


def _listed(steps: Sequence[StepResult]) -> str:
    return ", ".join(_step(s) for s in steps)


def _first_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def deterministic_answer(
    request: AgentRequest, status: RunStatus, detail: str, plan: Plan | None, steps: Sequence[StepResult]
) -> str:
    """The answer written without a model, from the plan's answer template or the results."""
    run_id = request.run_id
    results = {s.step_id: s.result for s in steps if s.status is StepStatus.SUCCEEDED}
    if status in (RunStatus.SUCCEEDED, RunStatus.DEGRADED):
        text = None
        if plan is not None and plan.answer:
            text = plan.answer
        elif plan is not None and plan.answer_template is not None:
            text = render_answer(plan.answer_template, results)
        if text is None:
            found = facts(steps, max_chars=1200, max_items=10)
            text = ("Done. What the steps returned: " + "; ".join(found) + ".") if found else (
                "Done: nothing needed to run for this request.")
        if status is RunStatus.DEGRADED:
            described = {s.step_id: s.description for s in plan.steps} if plan is not None else {}
            missing = []
            for s in steps:
                if s.status is StepStatus.FAILED:
                    what = described.get(s.step_id) or _step(s)
                    why = _first_line((s.error or "unavailable").split(" (")[0], 160)
                    missing.append(f"{what[:1].lower()}{what[1:]} ({why})")
            text += (f" What I could not check: {'; '.join(missing)}. This answer goes without it; "
                     "try again later for the full answer.")
        return text
    undone = [s for s in steps if s.status is StepStatus.COMPENSATED]
    done = [s for s in steps if s.status is StepStatus.SUCCEEDED]
    parts: list[str] = []
    if status is RunStatus.WAITING:
        waiting = next((s for s in steps if s.status is StepStatus.WAITING), None)
        where = f"{_step(waiting)}" if waiting else "a step"
        parts.append(f"I need an approval before I can go on: {where} waits for a human's decision.")
        if waiting is not None:
            parts.append(f"An approver can run `agentkeel approve {run_id} {waiting.step_id}` (or `deny`), "
                         f"then `agentkeel resume {run_id}`.")
        return " ".join(parts)
    if status is RunStatus.IN_DOUBT:
        doubt = next((s for s in steps if s.status in (StepStatus.IN_DOUBT, StepStatus.RUNNING)), None)
        where = _step(doubt) if doubt else "a step"
        parts.append(f"I cannot tell whether {where} took effect, so I stopped rather than risk doing it twice.")
        if doubt is not None:
            parts.append(f"A human must check it, then run `agentkeel resume {run_id} --resolve "
                         f"{doubt.step_id}=done` (it happened) or `--resolve {doubt.step_id}=not-done`.")
        return " ".join(parts)
    if status is RunStatus.ROLLED_BACK:
        parts.append(f"Run {run_id} was rolled back" + (f": {_listed(undone)} undone." if undone else "."))
        return " ".join(parts)
    if status is RunStatus.RUNNING:
        parts.append(f"I stopped before finishing ({_first_line(detail or 'interrupted')}). Nothing is lost: "
                     f"`agentkeel resume {run_id}` continues where the run stopped.")
        return " ".join(parts)
    if status is RunStatus.CANCELLED:
        parts.append(f"The run was cancelled ({_first_line(detail or 'on request')}).")
    elif status is RunStatus.DENIED:
        parts.append(f"I may not do this: {_first_line(detail)}.")
        parts.append("Nothing that needed it was run; ask an administrator for access if you should have it.")
    elif status is RunStatus.BUDGET_EXHAUSTED:
        parts.append(f"I stopped because the budget ran out: {_first_line(detail)}.")
        if "resets at" in detail or "per_session_usd" in detail:
            parts.append("Try again once it resets, or ask an administrator to raise the limit.")
        else:
            parts.append("Try again with a larger budget (`--budget`).")
    elif status is RunStatus.REJECTED:
        parts.append(f"I could not make a plan that passes the checks: {_first_line(detail)}.")
        parts.append("Nothing was run. Rephrase the request or check that the tools it needs are installed.")
    else:
        failed = [s for s in steps if s.status is StepStatus.FAILED]
        if failed:
            last = failed[-1]
            parts.append(f"I could not complete your request: {_step(last)} failed: "
                         f"{_first_line(last.error or 'no reason given')}.")
        else:
            parts.append(f"I could not complete your request: {_first_line(detail or status.value)}.")
        parts.append("You can try again later, or rephrase the request.")
    if undone:
        parts.append(f"I undid what had been done: {_listed(undone)} rolled back.")
    kept = [s for s in done if s.status is StepStatus.SUCCEEDED]
    if kept and status is not RunStatus.DENIED:
        parts.append(f"Done before it stopped: {_listed(kept)}.")
    if "rollback incomplete" in detail or "left uncompensated" in detail:
        parts.append(f"Some effects could not be undone; `agentkeel show {run_id}` has the details.")
    return " ".join(parts)


@hookimpl(trylast=True)
def agentkeel_respond(
    request: AgentRequest, status: RunStatus, detail: str, plan: Plan | None, steps: Sequence[StepResult]
) -> Answer:
    source = "template"
    if status in (RunStatus.SUCCEEDED, RunStatus.DEGRADED) and plan is not None and plan.answer:
        source = f"planner:{plan.planner}" if plan.planner else "planner"
    return Answer(deterministic_answer(request, status, detail, plan, steps), source)
