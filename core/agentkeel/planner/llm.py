"""The default LLM planner: a chat completion that returns a wire-format plan.

Registered ``trylast`` so rule planners and third-party planners answer first.

- Endpoint: ``[models] base_url`` from the config, else ``$OPENAI_BASE_URL``,
  else OpenAI; key from ``$OPENAI_API_KEY`` (a placeholder when only a base URL
  is set, for local servers that ignore it). Neither set: ``PlanningError``.
- The model sees only ``tools`` (what the principal may call), the wire format
  and the memory context. Output is requested with ``response_format`` of type
  ``json_schema``; a server that answers 400 or 500 to it is asked again with
  ``json_object``, and that base URL is remembered by this planner (one per system).
- Validation: ``agentkeel.jsonvalue.loads`` (bounded: no NaN or Infinity, at
  most 64 levels of nesting, no lone surrogates) + at most ``[planner]
  max_steps`` steps + ``parse_plan`` + tool names in ``tools``, required
  arguments present, references to earlier steps only. An invalid answer gets
  ONE repair round (the answer and its errors are sent back); still invalid,
  the next tier of ``[[models.tiers]]`` (cheapest first) starts afresh.
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
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import agentkeel.jsonvalue as jsonvalue
from agentkeel.config import DEFAULT_MAX_STEPS
from agentkeel.cost.budget import bounded_usage, prompt_token_upper_bound
from agentkeel.errors import ConfigError, PlanningError, PlanRejectedError
from agentkeel.markers import hookimpl
from agentkeel.planner.plan import parse_plan, plan_wire_schema
from agentkeel.types import AgentRequest, MemoryContext, Plan, ToolSpec, Usage

if TYPE_CHECKING:
    import openai

    from agentkeel.config import Config, ModelTier
    from agentkeel.context import RunContext
    from agentkeel.cost.budget import Reservation

DEFAULT_MAX_RETRIES = 2
PLACEHOLDER_API_KEY = "not-needed"

log = logging.getLogger(__name__)

_WIRE_FORMAT = """\
Answer with ONE JSON object and nothing else:
{"reasoning": "<why these steps>",
 "steps": [{"description": "<what the step does>", "tool_name": "<a tool above>",
            "tool_args": {<arguments matching the tool's schema>}}]}
Steps are numbered 1, 2, 3... in order. Optional fields of a step:
- An argument may be {"$ref": "/N/field"}: a JSON Pointer into the result of an
  EARLIER step N, e.g. {"order_id": {"$ref": "/1/id"}}.
- "when": a condition on earlier results; the step is skipped when it is false:
  {"ref": "/N/field", "op": OP, "value": V} with OP one of eq, ne, in, not_in,
  gt, ge, lt, le (with "value"), exists, truthy (without); or {"all": [...]},
  {"any": [...]}, {"not": {...}}.
- "expect": a JSON Schema the step's result must satisfy.
Use only the tools listed above. If the request needs no tool, return "steps": []."""


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
        self, request: AgentRequest, context: MemoryContext, tools: Mapping[str, ToolSpec], run: RunContext
    ) -> Plan:
        """Plan with the configured tiers, cheapest first. Raises PlanningError or PlanRejectedError."""
        return await plan_with_tiers(request, context, tools, run, self.no_json_schema)


async def plan_with_tiers(
    request: AgentRequest,
    context: MemoryContext,
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    no_json_schema: set[str],
) -> Plan:
    import openai  # imported on first use: it takes longer to import than the rest of agentkeel

    config = run.config
    if not config.tiers:
        raise ConfigError(
            "no plan template matched and no LLM tiers are configured; add [[models.tiers]] to agentkeel.toml"
        )
    messages = build_messages(request, context, tools)
    reasons: list[str] = []
    only_rejections = True
    async with _client(config) as client:
        for tier in config.tiers:
            try:
                return await _plan_with_tier(client, tier, messages, tools, run, no_json_schema)
            except _InvalidAnswer as exc:
                reasons.append(f"tier {tier.name!r} ({tier.model}): " + "; ".join(exc.errors))
            except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
                raise PlanningError(
                    f"the LLM server refused the credentials: {exc}; check OPENAI_API_KEY"
                ) from exc
            except PlanningError as exc:
                only_rejections = False
                reasons.append(f"tier {tier.name!r} ({tier.model}): {exc}")
    if only_rejections:
        raise PlanRejectedError(reasons)
    raise PlanningError("every LLM tier failed: " + " | ".join(reasons))


def _client(config: Config) -> openai.AsyncOpenAI:
    import openai

    base_url = config.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = os.environ.get("OPENAI_API_KEY")
    if not api_key and not base_url:
        raise ConfigError(
            "no plan template matched and no LLM is configured: set OPENAI_API_KEY (and OPENAI_BASE_URL for an "
            "OpenAI-compatible server), or set [models] base_url in agentkeel.toml"
        )
    retries = config.section("plugins", "planner_llm").get("max_retries", DEFAULT_MAX_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ConfigError(
            f"invalid configuration in {config.source}: plugins.planner_llm.max_retries: "
            f"must be an integer >= 0, got {retries!r}"
        )
    return openai.AsyncOpenAI(
        api_key=api_key or PLACEHOLDER_API_KEY,
        base_url=base_url,
        timeout=config.llm_timeout_s,
        max_retries=retries,
        http_client=openai.DefaultAsyncHttpxClient(
            timeout=config.llm_timeout_s,
            event_hooks={"request": [_on_request], "response": [_on_response]},
        ),
    )


class _Attempts:
    """What became of the HTTP requests one call sent (the client may retry)."""

    __slots__ = ("error_answers", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.error_answers = 0

    @property
    def all_refused(self) -> bool:
        """Every request sent was answered with an HTTP error status: nothing to pay."""
        return self.error_answers == self.sent


_ATTEMPTS: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar("agentkeel_llm_attempts", default=None)


async def _on_request(request: Any) -> None:
    attempts = _ATTEMPTS.get()
    if attempts is not None:
        attempts.sent += 1


async def _on_response(response: Any) -> None:
    attempts = _ATTEMPTS.get()
    if attempts is not None and getattr(response, "status_code", 200) >= 400:
        attempts.error_answers += 1


def build_messages(
    request: AgentRequest, context: MemoryContext, tools: Mapping[str, ToolSpec]
) -> list[dict[str, str]]:
    """The system prompt (tools, wire format, memory) and the user's message."""
    lines = ["You plan tool calls for an agent. Tools you may use:"]
    for name in sorted(tools):
        spec = tools[name]
        lines.append(
            f"- {name}: {spec.description}\n  args (JSON Schema): {json.dumps(spec.args_schema, sort_keys=True)}"
        )
    if not tools:
        lines.append("(none: the plan must have no steps)")
    lines += ["", _WIRE_FORMAT]
    memory = context.render()
    if memory:
        lines += ["", "What you know about this user and conversation:", memory]
    return [
        {"role": "system", "content": "\n".join(lines)},
        {"role": "user", "content": request.message},
    ]


async def _plan_with_tier(
    client: openai.AsyncOpenAI,
    tier: ModelTier,
    messages: list[dict[str, str]],
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    no_json_schema: set[str],
) -> Plan:
    """One attempt and at most one repair round on ``tier``. Raises _InvalidAnswer or PlanningError."""
    planner = f"llm:{tier.name}"
    max_steps = run.config.max_steps
    answer, truncated = await _complete(client, tier, messages, tools, run, no_json_schema)
    try:
        return validate_answer(answer, tools, planner=planner, truncated=truncated, max_steps=max_steps, run=run)
    except _InvalidAnswer as exc:
        repair = [
            *messages,
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": _repair_prompt(exc.errors)},
        ]
    answer, truncated = await _complete(client, tier, repair, tools, run, no_json_schema)
    return validate_answer(answer, tools, planner=planner, truncated=truncated, max_steps=max_steps, run=run)


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
) -> Plan:
    """Parse and check one answer; raises _InvalidAnswer listing every problem.

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
        plan = parse_plan(data, planner=planner)
    except PlanRejectedError as exc:
        raise _InvalidAnswer(exc.reasons) from exc
    errors: list[str] = []
    for step in plan.steps:
        where = f"steps[{step.step_id - 1}] (step {step.step_id})"
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
) -> tuple[str | None, bool]:
    """One priced chat completion (with the json_schema -> json_object fallback).

    Returns the answer's text and whether it was cut off at ``max_tokens``.
    """
    import openai

    key = str(client.base_url)
    use_schema = key not in no_json_schema
    deadline_s = run.config.tier_timeout_s(tier)
    while True:
        if use_schema:
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": "plan", "schema": plan_wire_schema(tools), "strict": False},
            }
        else:
            response_format = {"type": "json_object"}
        # The bound covers everything sent: the messages and the response format's schema.
        sent = [*messages, {"role": "system", "content": json.dumps(response_format)}]
        prompt_bound = prompt_token_upper_bound(sent)
        reservation = run.reserve_llm(tier.model, sent, tier.max_tokens)
        attempts = _Attempts()
        token = _ATTEMPTS.set(attempts)
        try:
            async with asyncio.timeout(deadline_s):
                response = await client.chat.completions.create(  # type: ignore[call-overload]
                    model=tier.model,
                    messages=messages,
                    max_tokens=tier.max_tokens,
                    temperature=tier.temperature,
                    response_format=response_format,
                    timeout=deadline_s,
                )
        except TimeoutError as exc:
            if attempts.sent and attempts.all_refused:
                reservation.release()  # waiting out a Retry-After: every answer so far was an error
            else:
                _settle_worst_case(run, reservation, tier, prompt_bound)
            raise PlanningError(
                f"{tier.model} did not answer within its {deadline_s:g} s deadline "
                f"({attempts.sent} request(s) sent, retries and Retry-After waits included)"
            ) from exc
        except openai.BadRequestError as exc:
            _settle_failed(run, reservation, tier, prompt_bound, attempts)
            if use_schema:
                use_schema = False
                continue
            raise PlanningError(f"{tier.model} rejected the request (400): {exc.message}") from exc
        except openai.InternalServerError as exc:
            _settle_failed(run, reservation, tier, prompt_bound, attempts)
            if use_schema:  # llama_cpp.server answers json_schema with a 500: ask in JSON mode
                use_schema = False
                continue
            raise PlanningError(f"{tier.model} failed with HTTP {exc.status_code}: {exc.message}") from exc
        except openai.APIStatusError as exc:
            _settle_failed(run, reservation, tier, prompt_bound, attempts)
            if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
                raise
            raise PlanningError(
                f"{tier.model} failed with HTTP {exc.status_code}: {exc.message}"
            ) from exc
        except openai.APIConnectionError as exc:
            if _never_sent(exc):
                reservation.release()  # nothing reached a server: nothing to pay
            else:
                _settle_worst_case(run, reservation, tier, prompt_bound)
            raise PlanningError(f"{tier.model} call failed: {type(exc).__name__}: {exc}") from exc
        except (openai.APIError, json.JSONDecodeError) as exc:
            _settle_worst_case(run, reservation, tier, prompt_bound)
            raise PlanningError(f"{tier.model} call failed: {type(exc).__name__}: {exc}") from exc
        finally:
            _ATTEMPTS.reset(token)
        if response_format["type"] == "json_object":
            no_json_schema.add(key)
        _settle_usage(run, reservation, tier, prompt_bound, response.usage)
        if not response.choices:
            return None, False
        choice = response.choices[0]
        return choice.message.content, choice.finish_reason == "length"


def _settle_usage(
    run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int, usage: Any
) -> None:
    """Settle a call that succeeded to its reported usage, bounded by what was reserved."""
    if usage is None:
        _settle_worst_case(run, reservation, tier, prompt_bound)
        return
    billed, problems = bounded_usage(
        getattr(usage, "prompt_tokens", None),
        getattr(usage, "completion_tokens", None),
        prompt_bound=prompt_bound,
        max_tokens=tier.max_tokens,
    )
    if problems:
        log.warning(
            "%s (tier %r) reported unusable usage: %s; billed %d prompt and %d completion tokens "
            "instead (the bounds reserved for the call), marked estimated",
            tier.model, tier.name, "; ".join(problems), billed.input_tokens, billed.output_tokens,
        )
    run.settle_llm(reservation, model=tier.model, tier=tier.name, usage=billed, estimated=bool(problems))


def _settle_failed(
    run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int, attempts: _Attempts
) -> None:
    """A call that ended in an HTTP error status: free, unless an earlier attempt's fate is unknown."""
    if attempts.all_refused:
        reservation.release()
    else:  # an earlier attempt timed out or lost its connection, then the client retried
        _settle_worst_case(run, reservation, tier, prompt_bound)


def _settle_worst_case(run: RunContext, reservation: Reservation, tier: ModelTier, prompt_bound: int) -> None:
    worst = Usage(prompt_bound, tier.max_tokens)
    run.settle_llm(reservation, model=tier.model, tier=tier.name, usage=worst, estimated=True)


def _never_sent(exc: BaseException) -> bool:
    """True when the request provably never reached a server: behind the error is the
    HTTP library's ``ConnectError`` (refused, unresolvable) or ``ConnectTimeout``.
    Matched by class name, so this works whichever HTTP library the client uses."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 20:
        names = {klass.__name__ for klass in type(cause).__mro__}
        if names & {"ConnectError", "ConnectTimeout"}:
            return True
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False
