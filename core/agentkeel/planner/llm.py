"""The default LLM planner: a chat completion that returns a wire-format plan.

Registered ``trylast`` so rule planners and third-party planners answer first.

- Endpoint: ``[models] base_url`` from the config, else ``$OPENAI_BASE_URL``,
  else OpenAI; key from ``$OPENAI_API_KEY`` (a placeholder when only a base URL
  is set, for local servers that ignore it). Neither set: ``ConfigError``.
- The model sees only ``tools`` (what the principal may call), the wire format
  and the memory context. Output is requested with ``response_format`` of type
  ``json_schema``; a server that answers 400 or 500 to it is asked again with
  ``json_object``, and that base URL is remembered by this planner (one per system).
- Later revisions (``progress`` given: a replan after a failed step, or the next
  round of a plan marked ``observe``): the model is also shown every step so far
  with its result, and the failure, as quoted untrusted data
  (``agentkeel.models.data``, at most ``[plugins.planner_llm] max_data_bytes``,
  default 16 KiB), told to number its steps from ``progress.next_step_id``, and
  for a replan to plan a different approach (completed steps are not run
  again; those that succeeded can be referenced by their ids). It may answer
  ``"final": true`` with an ``"answer"`` and no steps. With no tiers or no
  endpoint, a later revision is not planned (None) rather than a ``ConfigError``.
- Validation: ``agentkeel.jsonvalue.loads`` (bounded: no NaN or Infinity, at
  most 64 levels of nesting, no lone surrogates) + at most ``[planner]
  max_steps`` steps + ``parse_plan`` (numbered from the first step id; "final"
  with steps, "observe" without steps and the like are refused) + tool names in
  ``tools``, required arguments present, references to earlier steps only (of
  this plan, or earlier steps of the run that succeeded). An invalid answer
  gets ONE repair round (the answer and its errors are sent back); still
  invalid, the next tier of ``[[models.tiers]]`` (cheapest first) starts afresh.
- Retries of failed HTTP calls happen in one layer only: the openai client's
  (``max_retries``, honouring ``Retry-After``; ``[plugins.planner_llm]
  max_retries`` in the config, default 2). This module never re-sends a failed
  call itself: after the client gives up, the cascade moves to the next tier.
- Deadline: each call, the client's retries and ``Retry-After`` waits
  included, ends within the tier's ``timeout_s`` (``[models] timeout_s`` unless
  the tier sets its own). A call past its deadline is cancelled and that tier
  has failed: the cascade moves to the next tier.
- Budget: before every call the worst case is reserved with
  ``run.reserve_llm`` (``BudgetExceededError`` propagates, nothing is sent);
  after it the reservation is settled to the reported usage. A call that ends
  in an HTTP error status is released (an error answer is not billed), and so is
  one that never reached a server (connection refused) and one whose deadline
  passed while every request sent had been answered with an error (waiting out a
  ``Retry-After``). A call whose fate is unknown (timed out after sending,
  connection lost mid-answer, unreadable body, usage not reported) is settled to
  the worst case and its cost record is marked ``estimated``: an unknown cost is
  never recorded as free.
- Reported usage is checked before it is billed (``bounded_usage``): counts
  must be integers >= 0, prompt tokens at most the reservation's bound on what
  was sent, completion tokens at most ``max_tokens``. A count that is not is
  replaced by its bound, a warning is logged and the cost record is marked
  ``estimated``; the answer itself is still used (the call did succeed). So a
  server's usage can never add money to the budget, nor bill more than was
  reserved.
- No tiers, or no endpoint, while no template matched: ``ConfigError``.

The client, the deadline and the billing are ``agentkeel.models.completion``'s,
shared with the LLM responder.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import agentkeel.jsonvalue as jsonvalue
from agentkeel.config import DEFAULT_MAX_STEPS
from agentkeel.errors import ConfigError, PlanningError, PlanRejectedError
from agentkeel.markers import hookimpl
from agentkeel.models.completion import (
    DEFAULT_MAX_RETRIES,
    PLACEHOLDER_API_KEY,
    LLMAuthError,
    LLMCallError,
    LLMStatusError,
    complete,
    endpoint_configured,
    make_client,
)
from agentkeel.models.data import DEFAULT_MAX_DATA_BYTES, MIN_DATA_BYTES, quote_memory, quote_steps
from agentkeel.planner.plan import parse_plan, plan_wire_schema
from agentkeel.types import AgentRequest, MemoryContext, Plan, Progress, StepResult, StepStatus, ToolSpec

if TYPE_CHECKING:
    import openai

    from agentkeel.config import Config, ModelTier
    from agentkeel.context import RunContext

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "PLACEHOLDER_API_KEY",
    "LLMPlanner",
    "build_messages",
    "plan_with_tiers",
    "validate_answer",
]

_UNCONFIGURED = (
    "no plan template matched and no LLM is configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for an "
    "OpenAI-compatible server), or set [models] base_url in agentkeel.toml"
)


def _wire_format(first_step_id: int = 1) -> str:
    n = first_step_id
    return f"""\
Answer with ONE JSON object and nothing else:
{{"reasoning": "<why these steps>",
 "steps": [{{"description": "<what the step does>", "tool_name": "<a tool above>",
            "tool_args": {{<arguments matching the tool's schema>}}}}]}}
Steps are numbered {n}, {n + 1}, {n + 2}... in order. Optional fields of a step:
- An argument may be {{"$ref": "/N/field"}}: a JSON Pointer into the result of an
  EARLIER step N, e.g. {{"order_id": {{"$ref": "/1/id"}}}}.
- "when": a condition on earlier results; the step is skipped when it is false:
  {{"ref": "/N/field", "op": OP, "value": V}} with OP one of eq, ne, in, not_in,
  gt, ge, lt, le (with "value"), exists, truthy (without); or {{"all": [...]}},
  {{"any": [...]}}, {{"not": {{...}}}}.
- "expect": a JSON Schema the step's result must satisfy.
- "optional": true: the request can be answered without this step; if its tool
  is unavailable the run goes on without it (and the answer says what is missing).
- "depends_on": [N, ...]: EARLIER steps this one must wait for although it reads
  none of their results. Steps that depend on nothing unfinished run at the same
  time, so plan independent lookups as separate steps without references.
Optional fields of the plan:
- "observe": true: you need to see the results of these steps before you can
  decide what to do next. Once they have run you are asked again, shown their
  results, and plan the next steps (or answer).
- "final": true with "answer": "<the answer to the user>" and "steps": []:
  nothing (more) needs to run; this ends the request with your answer. Never
  set "final" on a plan that has steps.
Use only the tools listed above. If the request needs no tool, return "steps": []
(with "final": true and your "answer")."""


class _InvalidAnswer(Exception):
    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


class LLMPlanner:
    """The default LLM planner (one per system: it remembers which servers lack json_schema)."""

    def __init__(self) -> None:
        self.no_json_schema: set[str] = set()

    @hookimpl(trylast=True)
    async def agentkeel_plan(
        self,
        request: AgentRequest,
        context: MemoryContext,
        tools: Mapping[str, ToolSpec],
        run: RunContext,
        progress: Progress | None = None,
    ) -> Plan | None:
        """Plan with the configured tiers, cheapest first. Raises PlanningError or PlanRejectedError.

        With ``progress`` (a later revision) and no LLM configured: None (cannot plan it)."""
        if progress is not None and not (run.config.tiers and endpoint_configured(run.config)):
            return None
        return await plan_with_tiers(request, context, tools, run, self.no_json_schema, progress=progress)


async def plan_with_tiers(
    request: AgentRequest,
    context: MemoryContext,
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    no_json_schema: set[str],
    *,
    progress: Progress | None = None,
) -> Plan:
    config = run.config
    if not config.tiers:
        raise ConfigError(
            "no plan template matched and no LLM tiers are configured; add [[models.tiers]] to agentkeel.toml"
        )
    messages = build_messages(request, context, tools, progress=progress, max_data_bytes=max_data_bytes(config))
    first_step_id = progress.next_step_id if progress is not None else 1
    earlier = frozenset(progress.results) if progress is not None else frozenset()
    reasons: list[str] = []
    only_rejections = True
    start = _escalated_start(config, progress)
    async with make_client(config, unconfigured=_UNCONFIGURED) as client:
        for index, tier in enumerate(config.tiers[start:], start=start):
            # why the call is made, for the cost ledger
            if start or (progress is None and index > 0):
                reason = "escalation"
            else:
                reason = progress.reason if progress is not None else "first_tier"
            try:
                return await _plan_with_tier(
                    client, tier, messages, tools, run, no_json_schema, first_step_id, earlier, reason)
            except _InvalidAnswer as exc:
                reasons.append(f"tier {tier.name!r} ({tier.model}): " + "; ".join(exc.errors))
            except LLMAuthError as exc:
                raise PlanningError(
                    f"the LLM server refused the credentials: {exc}; check OPENAI_API_KEY"
                ) from exc
            except LLMCallError as exc:
                only_rejections = False
                reasons.append(f"tier {tier.name!r} ({tier.model}): {exc}")
    if only_rejections:
        raise PlanRejectedError(reasons)
    raise PlanningError("every LLM tier failed: " + " | ".join(reasons))


def _escalated_start(config: Config, progress: Progress | None) -> int:
    """The evaluator-gated cascade: a replan after a step whose result an evaluator
    rejected (a judge scored it under its ``min_score``) starts at the tier after the one
    that made the rejected plan; any other planning starts at the cheapest tier.
    ``PlanningError`` when that plan came from the strongest tier already."""
    if progress is None or progress.reason != "replan" or not progress.plans:
        return 0
    failed = [s for s in progress.steps if s.status is StepStatus.FAILED]
    if not failed or failed[-1].verdict is None or failed[-1].verdict.passed:
        return 0  # the tool failed, not the decision: replan from the cheapest tier
    planner = progress.plans[-1].planner
    names = [t.name for t in config.tiers]
    if not planner.startswith("llm:") or planner[4:] not in names:
        return 0
    start = names.index(planner[4:]) + 1
    if start >= len(names):
        raise PlanningError(f"the result of a plan by tier {planner[4:]!r} was judged poor and no stronger "
                            "tier is configured to escalate to")
    return start


def max_data_bytes(config: Config) -> int:
    """``[plugins.planner_llm] max_data_bytes``: the cap on the quoted step data of a prompt."""
    value = config.section("plugins", "planner_llm").get("max_data_bytes", DEFAULT_MAX_DATA_BYTES)
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_DATA_BYTES:
        raise ConfigError(
            f"invalid configuration in {config.source}: plugins.planner_llm.max_data_bytes: "
            f"must be an integer >= {MIN_DATA_BYTES}, got {value!r}"
        )
    return value


def build_messages(
    request: AgentRequest,
    context: MemoryContext,
    tools: Mapping[str, ToolSpec],
    *,
    progress: Progress | None = None,
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
) -> list[dict[str, str]]:
    """The system prompt (tools, wire format, memory; for a later revision what happened so
    far, as quoted data) and the user's message."""
    lines = ["You plan tool calls for an agent. Tools you may use:"]
    for name in sorted(tools):
        spec = tools[name]
        lines.append(
            f"- {name}: {spec.description}\n  args (JSON Schema): {json.dumps(spec.args_schema, sort_keys=True)}"
        )
    if not tools:
        lines.append("(none: the plan must have no steps)")
    lines += ["", _wire_format(progress.next_step_id if progress is not None else 1)]
    memory = quote_memory(context)
    if memory:
        lines += ["", "What you know about this user and conversation:", memory]
    if progress is not None:
        lines += ["", _progress_text(progress, max_data_bytes)]
    return [
        {"role": "system", "content": "\n".join(lines)},
        {"role": "user", "content": request.message},
    ]


def _progress_text(progress: Progress, max_data_bytes: int) -> str:
    """What a planner asked for a later revision is told: what happened, and how to go on."""
    n = progress.next_step_id
    succeeded = sorted(progress.results)
    if progress.reason == "replan":
        why = ("A step of the plan failed (the failure is in the data below). Plan a different approach: "
               "completed steps are not run again; steps that succeeded can be referenced by their ids "
               "(an argument {\"$ref\": \"/N/field\"} or a \"when\" on step N). Do not plan the approach "
               "that failed again; if the request cannot be done another way, answer with \"final\": true "
               "and say what could not be done.")
    else:
        why = ("The steps planned so far have run, and you asked to observe their results (in the data "
               "below). Plan the next round: the steps still needed (with \"observe\": true again if you "
               "must see their results before deciding), or, when nothing more needs to run, "
               "\"final\": true with your \"answer\" and no steps. Steps that ran are not run again; "
               "those that succeeded can be referenced by their ids.")
    refs = ", ".join(map(str, succeeded)) if succeeded else "none"
    numbering = (f"Number the steps of your plan from {n}: its first step is step {n}, the next step "
                 f"{n + 1}, and so on. Earlier steps that succeeded, which you may reference: {refs}.")
    data = quote_steps(_steps_so_far(progress),
                       extra={"failure": progress.failure} if progress.failure else None,
                       max_bytes=max_data_bytes)
    return "\n".join(["What happened so far:", why, numbering, data.text])


def _steps_so_far(progress: Progress) -> list[StepResult]:
    """Every step so far, in step order: its result, or, planned but never run, as pending."""
    by_id = {s.step_id: s for s in progress.steps}
    for plan in progress.plans:
        for step in plan.steps:
            by_id.setdefault(step.step_id, StepResult(step.step_id, step.tool_name, StepStatus.PENDING,
                                                      tool_args=step.tool_args))
    return [by_id[i] for i in sorted(by_id)]


async def _plan_with_tier(
    client: openai.AsyncOpenAI,
    tier: ModelTier,
    messages: list[dict[str, str]],
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    no_json_schema: set[str],
    first_step_id: int = 1,
    earlier_results: Collection[int] = (),
    reason: str = "first_tier",
) -> Plan:
    """One attempt and at most one repair round on ``tier``. Raises _InvalidAnswer or LLMCallError."""
    planner = f"llm:{tier.name}"
    checks: dict[str, Any] = {"planner": planner, "max_steps": run.config.max_steps, "run": run,
                              "first_step_id": first_step_id, "earlier_results": earlier_results}
    answer, truncated = await _complete(client, tier, messages, tools, run, no_json_schema, reason)
    try:
        return validate_answer(answer, tools, truncated=truncated, **checks)
    except _InvalidAnswer as exc:
        repair = [
            *messages,
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": _repair_prompt(exc.errors)},
        ]
    answer, truncated = await _complete(client, tier, repair, tools, run, no_json_schema, "repair")
    return validate_answer(answer, tools, truncated=truncated, **checks)


def _repair_prompt(errors: Sequence[str]) -> str:
    listed = "\n".join(f"- {e}" for e in errors)
    return f"Your plan was rejected:\n{listed}\nAnswer again with the corrected plan as one JSON object only."


def validate_answer(
    answer: str | None,
    tools: Mapping[str, ToolSpec],
    *,
    planner: str,
    truncated: bool = False,
    max_steps: int = DEFAULT_MAX_STEPS,
    run: RunContext | None = None,
    first_step_id: int = 1,
    earlier_results: Collection[int] = (),
) -> Plan:
    """Parse and check one answer; raises _InvalidAnswer listing every problem.

    The plan's steps are numbered from ``first_step_id``; a step may refer to an
    earlier step of the plan and, below ``first_step_id``, only to the ids in
    ``earlier_results`` (the earlier steps of the run that succeeded). A final
    answer (``"final": true``) is a plan with no steps and ``answer`` set.

    A step naming a registered tool the principal may not call (``run.tools`` holds
    every registered tool, ``tools`` the permitted ones) is a refusal on permission
    grounds: it is reported to ``run.refused`` (the audit log) as well."""
    if not answer:
        raise _InvalidAnswer(["the answer was empty; return the plan as a JSON object"])
    data = _decode_answer(answer, truncated)
    steps = data.get("steps") if isinstance(data, dict) else None
    if isinstance(steps, list) and len(steps) > max_steps:
        raise _InvalidAnswer(
            [f"the plan has {len(steps)} steps, more than the {max_steps} allowed; plan fewer steps"]
        )
    try:
        plan = parse_plan(data, planner=planner, first_step_id=first_step_id)
    except PlanRejectedError as exc:
        raise _InvalidAnswer(exc.reasons) from exc
    errors: list[str] = []
    for step in plan.steps:
        where = f"steps[{step.step_id - first_step_id}] (step {step.step_id})"
        spec = tools.get(step.tool_name)
        if spec is None:
            if run is not None and step.tool_name in run.tools:
                run.refused(step.tool_name, f"planner {planner} proposed {step.tool_name}, which "
                            f"{run.principal.name!r} may not call; the proposal was refused")
            available = ", ".join(sorted(tools)) or "none"
            errors.append(
                f"{where}: tool {step.tool_name!r} is not available; use one of: {available}"
            )
            continue
        missing = [a for a in spec.args_schema.get("required", ()) if a not in step.tool_args]
        if missing:
            errors.append(
                f"{where}: {step.tool_name} is missing required argument(s) {', '.join(missing)}"
            )
        later = sorted(d for d in step.depends_on if d >= step.step_id)
        if later:
            errors.append(
                f"{where}: refers to step(s) {later}; a step may only refer to earlier steps"
            )
        gone = sorted(d for d in step.depends_on if d < first_step_id and d not in earlier_results)
        if gone:
            allowed = ", ".join(map(str, sorted(earlier_results))) or "none"
            errors.append(
                f"{where}: refers to step(s) {gone} of an earlier plan, which have no result; "
                f"refer only to earlier steps that succeeded ({allowed}) or to earlier steps of this plan"
            )
    if errors:
        raise _InvalidAnswer(errors)
    return plan


_ANSWER = "the answer"


def _decode_answer(answer: str, truncated: bool) -> Any:
    """The answer's JSON value, decoded with ``jsonvalue``'s limits; raises _InvalidAnswer."""
    try:
        return jsonvalue.loads(answer, what=_ANSWER)
    except jsonvalue.JSONValueError as exc:
        cut = " (it was cut off at max_tokens: make the plan shorter)" if truncated else ""
        detail = str(exc).removeprefix(_ANSWER).lstrip(": ")
        raise _InvalidAnswer([f"the answer is not valid JSON{cut}: {detail}"]) from None


async def _complete(
    client: openai.AsyncOpenAI,
    tier: ModelTier,
    messages: list[dict[str, str]],
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    no_json_schema: set[str],
    reason: str = "first_tier",
) -> tuple[str | None, bool]:
    """One priced chat completion with the json_schema -> json_object fallback.

    Returns the answer's text and whether it was cut off at ``max_tokens``.
    Raises ``LLMCallError`` (``BudgetExceededError`` from the reservation)."""
    key = str(client.base_url)
    use_schema = key not in no_json_schema
    while True:
        if use_schema:
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": "plan", "schema": plan_wire_schema(tools), "strict": False},
            }
        else:
            response_format = {"type": "json_object"}
        try:
            done = await complete(client, tier, messages, run, response_format=response_format, purpose="plan",
                                  reason=reason)
        except LLMStatusError as exc:
            # A 400 or a 500 to json_schema is taken for a server that cannot do it
            # (llama_cpp.server answers json_schema with a 500): ask in JSON mode.
            code = exc.status_code or 0
            if use_schema and not isinstance(exc, LLMAuthError) and (code == 400 or code >= 500):
                use_schema = False
                continue
            raise
        if not use_schema:
            no_json_schema.add(key)
        return done.text, done.truncated
