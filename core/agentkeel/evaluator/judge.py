"""The LLM judge: an optional evaluator that asks the cheapest tier to score a step's
result against a rubric. Off unless ``[judge] rubric`` is set.

- ``[judge] rubric``: what a good result is, in words (the judge scores 0 to 1).
- ``[judge] tools``: the tools whose results are judged (default: every tool).
- ``[judge] min_score`` (default 0.5): a result scored below it is rejected, with
  the judge's reason (a rejected result of a tool that is not retry-safe is
  never retried: its effect stands, as with any verdict).
- ``[judge] tier`` (default: the first, cheapest tier), ``max_tokens`` (256).
- ``[judge] answers = true``: the LLM responder's answer is judged too; a poor
  one is written again by the next tier (reason ``escalation``) while the budget
  affords it, and the best-judged answer is kept.

One chat completion per judged result, budgeted like the planner's calls (the
worst case is reserved against the run's budget and every budget scope first;
the cost is a ledger row with purpose ``judge``). The result is sent as quoted
data (``agentkeel.models.data``), never as instructions. The answer must be
``{"score": 0..1, "reason": "..."}`` (asked for with ``json_schema``, JSON mode
when the server refuses that); a judge that cannot answer (no budget left, the
call failed, an answer that is not a score) abstains, with a warning: the other
evaluators still decide.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

import agentkeel.jsonvalue as jsonvalue
from agentkeel.errors import BudgetExceededError, ConfigError, UnknownModelPriceError
from agentkeel.markers import hookimpl
from agentkeel.models.completion import LLMCallError, LLMStatusError, complete, make_client
from agentkeel.models.data import quote_steps
from agentkeel.types import PlanStep, StepResult, StepStatus, ToolSpec, Verdict

if TYPE_CHECKING:
    from agentkeel.config import Config, ModelTier
    from agentkeel.context import RunContext

log = logging.getLogger(__name__)

DEFAULT_MIN_SCORE = 0.5
DEFAULT_MAX_TOKENS = 256
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["score", "reason"],
    "additionalProperties": False,
    "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}, "reason": {"type": "string"}},
}


@attrs.frozen
class JudgeSettings:
    rubric: str
    tier: ModelTier
    tools: frozenset[str] | None
    min_score: float
    answers: bool = False
    """``[judge] answers``: the LLM responder's answers are judged too (and re-asked of the next tier when poor)."""


def judge_settings(config: Config) -> JudgeSettings | None:
    """``[judge]``, validated (None when no rubric is set); ``ConfigError`` naming the field."""
    section = config.section("judge")
    if not section:
        return None

    def bad(field: str, why: str, value: Any) -> ConfigError:
        return ConfigError(f"invalid configuration in {config.source}: judge.{field}: {why}, got {value!r}")

    rubric = section.get("rubric")
    if not isinstance(rubric, str) or not rubric.strip():
        raise bad("rubric", "must say in words what a good result is", rubric)
    min_score = section.get("min_score", DEFAULT_MIN_SCORE)
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)) or not (
            math.isfinite(min_score) and 0 <= min_score <= 1):
        raise bad("min_score", "must be a number from 0 to 1", min_score)
    tools = section.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, str) for t in tools)):
        raise bad("tools", "must be a list of tool names", tools)
    max_tokens = section.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 16:
        raise bad("max_tokens", "must be an integer >= 16", max_tokens)
    answers = section.get("answers", False)
    if not isinstance(answers, bool):
        raise bad("answers", "must be true or false", answers)
    if not config.tiers:
        raise bad("tier", "a judge needs an LLM: add [[models.tiers]]", None)
    name = section.get("tier", config.tiers[0].name)
    named = [t for t in config.tiers if t.name == name]
    if not named:
        raise bad("tier", f"must name a tier of [[models.tiers]] ({', '.join(t.name for t in config.tiers)})", name)
    return JudgeSettings(rubric.strip(), attrs.evolve(named[0], max_tokens=max_tokens),
                         frozenset(tools) if tools is not None else None, float(min_score), answers)


class LLMJudge:
    """The LLM judge (one per system). Not configured, it costs a step one dict lookup."""

    def __init__(self) -> None:
        self._settings: tuple[Config, JudgeSettings | None] | None = None

    def settings(self, config: Config) -> JudgeSettings | None:
        cached = self._settings
        if cached is None or cached[0] is not config:
            cached = self._settings = (config, judge_settings(config))
        return cached[1]

    @hookimpl
    def agentkeel_startup(self, config: Config, tools: Mapping[str, ToolSpec]) -> None:
        """Refuse a bad ``[judge]`` section, or one naming tools nobody registers, at start-up."""
        settings = self.settings(config)
        if settings is not None and settings.tools is not None:
            unknown = sorted(settings.tools - set(tools))
            if unknown:
                raise ConfigError(f"invalid configuration in {config.source}: judge.tools: no loaded plugin "
                                  f"registers {', '.join(unknown)}")

    @hookimpl
    def agentkeel_evaluate(
        self, step: PlanStep, tool: ToolSpec, result: Any, run: RunContext
    ) -> Awaitable[Verdict | None] | None:
        """An awaitable judgement for the judged tools; None (abstain, synchronously) otherwise."""
        settings = self.settings(run.config)
        if settings is None or (settings.tools is not None and tool.name not in settings.tools):
            return None
        return judge(step, tool, result, run, settings)


async def judge(
    step: PlanStep, tool: ToolSpec, result: Any, run: RunContext, settings: JudgeSettings
) -> Verdict | None:
    """One priced judgement of a step's ``result``; None (with a warning) when none can be had."""
    data = quote_steps([StepResult(step.step_id, tool.name, StepStatus.SUCCEEDED, step.tool_args, result)])
    what = f"step {step.step_id} ({tool.name})"
    return await _score(run, settings, what, (
        "You judge the result of one tool call for an agent. Score it from 0 (useless or wrong) to 1 "
        "(exactly what was needed) against the rubric, and give a one-sentence reason. Answer with one "
        'JSON object: {"score": <0..1>, "reason": "<why>"}.\n\n'
        f"Rubric: {settings.rubric}\n\nThe step: {step.description or tool.name} ({tool.name}: "
        f"{tool.description})\n\n{data.text}"))


async def judge_answer(answer: str, run: RunContext, settings: JudgeSettings) -> Verdict | None:
    """One priced judgement of the answer written to the user; None when none can be had."""
    quoted = quote_steps([], extra={"answer": answer})
    return await _score(run, settings, "the answer", (
        "You judge the answer an agent wrote to a user's request (the user's message follows). Score it "
        "from 0 (wrong, unhelpful or unsupported) to 1 (exactly right) against the rubric, and give a "
        'one-sentence reason. Answer with one JSON object: {"score": <0..1>, "reason": "<why>"}.\n\n'
        f"Rubric: {settings.rubric}\n\n{quoted.text}"))


async def _score(run: RunContext, settings: JudgeSettings, what: str, system: str) -> Verdict | None:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": run.request.message}]
    formats: list[dict[str, Any]] = [
        {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": False}},
        {"type": "json_object"},
    ]
    try:
        async with make_client(run.config, unconfigured="the LLM judge has no endpoint: set [models] base_url, "
                                                         "OPENAI_BASE_URL or OPENAI_API_KEY") as client:
            for index, response_format in enumerate(formats):
                try:
                    done = await complete(client, settings.tier, messages, run, response_format=response_format,
                                          purpose="judge", reason="judge")
                    break
                except LLMStatusError as exc:  # a server that cannot do json_schema: ask in JSON mode
                    if index or not (exc.status_code == 400 or (exc.status_code or 0) >= 500):
                        raise
    except (BudgetExceededError, UnknownModelPriceError, LLMCallError, ConfigError) as exc:
        log.warning("the LLM judge did not judge %s: %s", what, exc)
        return None
    try:
        answer = jsonvalue.loads(done.text or "", what="the judge's answer")
        score, reason = answer["score"], answer.get("reason", "")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 1:
            raise ValueError(f"score {score!r} is not a number from 0 to 1")
    except (jsonvalue.JSONValueError, KeyError, TypeError, ValueError) as exc:
        log.warning("the LLM judge's answer for %s is not a verdict: %s", what, exc)
        return None
    text = " ".join(str(reason).split())[:300]
    passed = score >= settings.min_score
    why = f"judge ({settings.tier.name}) scored {score:g}" + ("" if passed else f" < {settings.min_score:g}")
    return Verdict(passed, float(score), f"{why}: {text}" if text else why)
