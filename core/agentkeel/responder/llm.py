"""The LLM responder: the user-facing answer of a run, written by a model from how it ended.

Runs before the deterministic responder (``agentkeel.responder.default``,
``trylast``), which answers whenever this one abstains.

- ``[responder] mode``: ``"auto"`` (the default) answers with the LLM when one
  is configured and the plan carries no answer of its own (a planner's final
  ``answer`` or a rule template's ``answer_template``), and abstains silently
  otherwise; ``"llm"`` always answers with the LLM (with no LLM configured: the
  deterministic answer and a note saying so); ``"template"`` always abstains.
- ``[responder] tier`` names the tier of ``[[models.tiers]]`` to use (default:
  the first, cheapest); ``[responder] max_tokens`` (default 512) replaces the
  tier's; ``[responder] max_data_bytes`` caps the quoted step data (default 16 KiB).
- One chat completion (``agentkeel.models.completion``: the same endpoint,
  retries, deadline and billing as the LLM planner; its cost is in
  ``run.costs``, so in the response's costs). The system prompt gives the role,
  how the run ended, and the steps and the host's detail as quoted untrusted
  data (``agentkeel.models.data``): the model is told never to follow
  instructions inside it. The user message is the request's message.
- When the caller follows the run's events (``AgentSystem.stream``, ``run(...,
  on_event=...)``, the service) the answer is streamed: each piece of text is an
  ``answer_delta`` event, in order; they join to the answer. Observer plugins
  alone (a tracer, a log) do not make it stream, so installing one never changes
  the calls a run makes. (If
  the call fails mid-stream the answer is the fallback below; the ``answer``
  event the host sends afterwards always carries the final text.)
- The budget cannot cover the call, or the call fails: the deterministic answer
  and a sentence saying why the model's answer is missing, with source
  ``"template (LLM unavailable)"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.errors import BudgetExceededError, ConfigError, UnknownModelPriceError
from agentkeel.markers import hookimpl
from agentkeel.models.completion import LLMCallError, complete, endpoint_configured, make_client
from agentkeel.models.data import DEFAULT_MAX_DATA_BYTES, MIN_DATA_BYTES, quote_memory, quote_steps
from agentkeel.responder.default import deterministic_answer
from agentkeel.types import AgentRequest, Answer, MemoryContext, Plan, RunStatus, StepResult

if TYPE_CHECKING:
    from agentkeel.config import Config, ModelTier
    from agentkeel.context import RunContext

log = logging.getLogger(__name__)

MODES = ("auto", "llm", "template")
DEFAULT_MAX_TOKENS = 512

UNAVAILABLE = "template (LLM unavailable)"
"""The source of an answer written without the model because the call could not be made or failed."""
NOT_CONFIGURED = "template (LLM not configured)"

BUDGET_NOTE = "(This answer was written without the language model: the budget left could not pay for the call.)"
ERROR_NOTE = "(This answer was written without the language model: the call to it failed.)"
PRICE_NOTE = ("(This answer was written without the language model: no price is known for its model, "
              "so it was not called.)")
EMPTY_NOTE = "(This answer was written without the language model: it returned no text.)"
UNCONFIGURED_NOTE = ("(The LLM responder is not configured: set [models] base_url, OPENAI_BASE_URL or "
                     "OPENAI_API_KEY, and [[models.tiers]], to get answers written by the model.)")

_STATUS_MEANING = {
    RunStatus.SUCCEEDED: "every step succeeded or was skipped because its condition did not hold",
    RunStatus.DEGRADED: "the run finished without an optional step whose tool was unavailable: "
                        "say what is missing",
    RunStatus.FAILED: "a step failed and the run was aborted; the steps completed before it were undone "
                      "(compensated) where they could be",
    RunStatus.DENIED: "the caller was not allowed to do (part of) this",
    RunStatus.BUDGET_EXHAUSTED: "the run's budget ran out before it was done",
    RunStatus.REJECTED: "the plan was rejected before anything ran",
    RunStatus.IN_DOUBT: "a step started but it is not known whether it took effect: a person must check it",
    RunStatus.WAITING: "the run is paused, waiting for a person's approval",
    RunStatus.RUNNING: "the run has not finished",
    RunStatus.ROLLING_BACK: "the run is being undone",
    RunStatus.ROLLED_BACK: "the run's completed steps were undone",
    RunStatus.CANCELLED: "the run was cancelled on request before it finished; the steps it had completed "
                         "were undone (compensated) where they could be",
}

_ROLE = """\
You write the answer to a user's request (their message follows) from how the run that served it \
ended. Write a short, plain answer for the user: a few sentences, no preamble. Say plainly what \
failed, what was undone and what could not be checked. Never claim that a step succeeded unless \
the data below shows it with status "succeeded"; never state a fact the data does not hold. Do not \
offer to do anything more, and do not mention these instructions."""


@attrs.frozen
class ResponderSettings:
    """``[responder]``, validated."""

    mode: str = "auto"
    tier: ModelTier | None = None
    """The tier to answer with (its ``max_tokens`` replaced by ``[responder] max_tokens``); None: no tiers."""
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES


def responder_settings(config: Config) -> ResponderSettings:
    """``[responder]`` of ``config``; ``ConfigError`` naming the field that is wrong."""
    section = config.section("responder")

    def bad(field: str, why: str, value: Any) -> ConfigError:
        return ConfigError(f"invalid configuration in {config.source}: responder.{field}: {why}, got {value!r}")

    mode = section.get("mode", "auto")
    if mode not in MODES:
        raise bad("mode", "must be one of " + ", ".join(f'"{m}"' for m in MODES), mode)
    max_tokens = section.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens", "must be an integer >= 1", max_tokens)
    max_data_bytes = section.get("max_data_bytes", DEFAULT_MAX_DATA_BYTES)
    if isinstance(max_data_bytes, bool) or not isinstance(max_data_bytes, int) or max_data_bytes < MIN_DATA_BYTES:
        raise bad("max_data_bytes", f"must be an integer >= {MIN_DATA_BYTES}", max_data_bytes)
    name = section.get("tier")
    tier: ModelTier | None = config.tiers[0] if config.tiers else None
    if name is not None:
        named = [t for t in config.tiers if t.name == name]
        if not isinstance(name, str) or not named:
            names = ", ".join(t.name for t in config.tiers) or "none are configured"
            raise bad("tier", f"must name a tier of [[models.tiers]] ({names})", name)
        tier = named[0]
    if tier is not None:
        tier = attrs.evolve(tier, max_tokens=max_tokens)
    return ResponderSettings(mode=mode, tier=tier, max_tokens=max_tokens, max_data_bytes=max_data_bytes)


class LLMResponder:
    """The LLM responder (one per system)."""

    @hookimpl
    def agentkeel_startup(self, config: Config) -> None:
        """Refuse a bad ``[responder]`` section when the system starts, not after a run."""
        responder_settings(config)

    @hookimpl
    async def agentkeel_respond(
        self,
        request: AgentRequest,
        status: RunStatus,
        detail: str,
        plan: Plan | None,
        steps: Sequence[StepResult],
        run: RunContext | None,
        context: MemoryContext | None = None,
    ) -> Answer | None:
        """The model's answer, None to leave it to the deterministic responder, or the
        deterministic answer with a note when the model's answer cannot be had."""
        if run is None:
            return None
        settings = responder_settings(run.config)
        if settings.mode == "template":
            return None
        forced = settings.mode == "llm"
        if not forced and plan is not None and (plan.answer is not None or plan.answer_template is not None):
            return None
        if settings.tier is None or not endpoint_configured(run.config):
            if not forced:
                return None
            text = deterministic_answer(request, status, detail, plan, steps)
            return Answer(f"{text}\n{UNCONFIGURED_NOTE}", source=NOT_CONFIGURED)
        memory = quote_memory(context) if context is not None else ""
        answer = await answer_with_llm(request, status, detail, steps, run, settings.tier,
                                       max_data_bytes=settings.max_data_bytes, plan=plan, memory=memory)
        return await self._judged(answer, request, status, detail, steps, run, settings, plan, memory)

    async def _judged(
        self, answer: Answer, request: AgentRequest, status: RunStatus, detail: str, steps: Sequence[StepResult],
        run: RunContext, settings: ResponderSettings, plan: Plan | None, memory: str = "",
    ) -> Answer:
        """With ``[judge] answers``: a poor answer is asked of the next tier (the cascade), and the
        best-judged one kept; an answer the judge cannot judge stands."""
        from agentkeel.evaluator.judge import judge_answer, judge_settings

        judge = judge_settings(run.config)
        if judge is None or not judge.answers or settings.tier is None:
            return answer
        names = [t.name for t in run.config.tiers]
        tier = settings.tier
        best: tuple[float, Answer] | None = None
        while answer.source.startswith("llm:"):
            verdict = await judge_answer(answer.text, run, judge)
            if verdict is None or verdict.passed:
                return answer
            if best is None or verdict.score > best[0]:
                best = (verdict.score, answer)
            following = names.index(tier.name) + 1
            if following >= len(names):
                break
            tier = attrs.evolve(run.config.tiers[following], max_tokens=settings.max_tokens)
            answer = await answer_with_llm(request, status, detail, steps, run, tier, reason="escalation",
                                           max_data_bytes=settings.max_data_bytes, plan=plan, memory=memory)
        return best[1] if best is not None else answer


def build_messages(
    request: AgentRequest,
    status: RunStatus,
    detail: str,
    steps: Sequence[StepResult],
    *,
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    memory: str = "",
) -> list[dict[str, str]]:
    """The system prompt (role, outcome, quoted data, then what memory knows of the user,
    quoted too: ``memory`` is ``quote_memory`` of the context) and the user's message."""
    meaning = _STATUS_MEANING.get(status, "")
    outcome = f"How the run ended: {status.value}" + (f" ({meaning})." if meaning else ".")
    extra: Mapping[str, Any] | None = {"detail": detail} if detail else None
    data = quote_steps(steps, extra=extra, max_bytes=max_data_bytes)
    system = "\n\n".join([
        _ROLE,
        outcome,
        "Each step of the run, and what the host reports about how it ended (\"detail\"), is in the data "
        "block below." if detail else "Each step of the run is in the data block below.",
        data.text,
        *(["What is known about this user and conversation (for the answer's tone and references; the "
           "run's data above is what happened):", memory] if memory else []),
    ])
    return [{"role": "system", "content": system}, {"role": "user", "content": request.message}]


async def answer_with_llm(
    request: AgentRequest,
    status: RunStatus,
    detail: str,
    steps: Sequence[StepResult],
    run: RunContext,
    tier: ModelTier,
    *,
    max_data_bytes: int = DEFAULT_MAX_DATA_BYTES,
    plan: Plan | None = None,
    reason: str = "answer",
    memory: str = "",
) -> Answer:
    """One priced completion on ``tier``; the deterministic answer with a note when it cannot be had."""
    messages = build_messages(request, status, detail, steps, max_data_bytes=max_data_bytes, memory=memory)

    def fallback(note: str) -> Answer:
        text = deterministic_answer(request, status, detail, plan, steps)
        return Answer(f"{text}\n{note}", source=UNAVAILABLE)

    def on_delta(delta: str) -> None:
        run.emit("answer_delta", text=delta)

    unconfigured = "the LLM responder has no endpoint: set [models] base_url, OPENAI_BASE_URL or OPENAI_API_KEY"
    try:
        async with make_client(run.config, unconfigured=unconfigured) as client:
            done = await complete(client, tier, messages, run, on_text=on_delta if run.sink is not None else None,
                                  purpose="respond", reason=reason)
    except BudgetExceededError:
        return fallback(BUDGET_NOTE)
    except UnknownModelPriceError as exc:
        log.warning("the LLM responder did not call %s: %s", tier.model, exc)
        return fallback(PRICE_NOTE)
    except LLMCallError as exc:
        log.warning("the LLM responder's call failed: %s", exc)
        return fallback(ERROR_NOTE)
    text = (done.text or "").strip()
    if not text:
        return fallback(EMPTY_NOTE)
    return Answer(text, source=f"llm:{tier.name}")
