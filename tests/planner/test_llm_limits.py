"""The LLM planner at its limits, against the scripted server (real openai client, real HTTP).

Answers that are too deep, hold NaN or have too many steps; usage a server
reports that is negative, absurd or not a number; rate limits asking for a wait
longer than the tier's deadline.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest
from agentkeel.cost.budget import prompt_token_upper_bound
from agentkeel.errors import ConfigError, PlanningError, PlanRejectedError
from agentkeel.testing.server import ScriptedOpenAIServer

from tests.planner.test_llm import FAST, GOOD_PLAN, make_run, plan_with


def deep(levels: int) -> str:
    """A plan whose argument is an array nested ``levels`` deep."""
    nested = "[" * levels + "]" * levels
    return (
        '{"reasoning": "r", "steps": [{"description": "d", "tool_name": "lookup_order", '
        f'"tool_args": {{"order_id": {nested}}}}}]}}'
    )


def refund_with(amount: str) -> str:
    return (
        '{"reasoning": "r", "steps": [{"description": "d", "tool_name": "issue_refund", '
        f'"tool_args": {{"order_id": "1001", "amount": {amount}}}}}]}}'
    )


def feedback(server: ScriptedOpenAIServer, request: int = 1) -> str:
    content: str = server.requests[request]["messages"][-1]["content"]
    return content


def bound_of(request: dict[str, Any]) -> int:
    """The most prompt tokens a request can cost: its messages and its response format."""
    sent = [*request["messages"], {"content": json.dumps(request["response_format"])}]
    return prompt_token_upper_bound(sent)


# --- answers the planner must not crash on -------------------------------------------


async def test_an_answer_3000_levels_deep_is_repaired_not_a_crash(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(deep(3000))
    openai_server.queue(GOOD_PLAN)
    plan = await plan_with(make_run(openai_server.base_url))
    assert plan.planner == "llm:fast"
    assert "nested more than 64 levels deep" in feedback(openai_server)


async def test_an_answer_a_little_too_deep_for_the_limit_is_refused_too(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(deep(200))  # not deep enough to crash json.loads: the limit itself refuses it
    openai_server.queue(GOOD_PLAN)
    await plan_with(make_run(openai_server.base_url))
    assert "nested more than 64 levels deep" in feedback(openai_server)


async def test_answers_100000_levels_deep_on_every_tier_are_a_clean_rejection(
    openai_server: ScriptedOpenAIServer,
) -> None:
    for _ in range(4):
        openai_server.queue("[" * 100_000 + "]" * 100_000, usage=(100, 10))
    run = make_run(openai_server.base_url, budget_usd=10.0)
    with pytest.raises(PlanRejectedError) as rejected:
        await plan_with(run)
    assert [r["model"] for r in openai_server.requests] == ["m-fast", "m-fast", "m-strong", "m-strong"]
    assert len(rejected.value.reasons) == 2
    assert all("nested more than 64 levels deep" in r for r in rejected.value.reasons)


@pytest.mark.parametrize(("literal", "name"), [("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
                                               ("1e999", "Infinity")])
async def test_a_non_finite_argument_is_repaired_naming_the_field(
    openai_server: ScriptedOpenAIServer, literal: str, name: str
) -> None:
    openai_server.queue(refund_with(literal))
    openai_server.queue(GOOD_PLAN)
    plan = await plan_with(make_run(openai_server.base_url))
    assert plan.planner == "llm:fast"
    text = feedback(openai_server)
    assert f"steps.0.tool_args.amount: {name} is not a JSON number" in text


async def test_non_finite_arguments_on_every_tier_are_rejected_naming_the_field(
    openai_server: ScriptedOpenAIServer,
) -> None:
    for _ in range(4):
        openai_server.queue(refund_with("NaN"))
    with pytest.raises(PlanRejectedError) as rejected:
        await plan_with(make_run(openai_server.base_url))
    assert all("steps.0.tool_args.amount: NaN is not a JSON number" in r for r in rejected.value.reasons)


async def test_a_lone_surrogate_in_the_answer_is_repaired(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue('{"reasoning": "\\ud800", "steps": []}')
    openai_server.queue(GOOD_PLAN)
    await plan_with(make_run(openai_server.base_url))
    assert "lone surrogate" in feedback(openai_server)


def steps(count: int) -> dict[str, Any]:
    step = {"description": "d", "tool_name": "lookup_order", "tool_args": {"order_id": "1"}}
    return {"reasoning": "r", "steps": [step] * count}


async def test_an_answer_with_more_steps_than_max_steps_is_repaired(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(steps(51))
    openai_server.queue(steps(50))
    plan = await plan_with(make_run(openai_server.base_url))
    assert len(plan.steps) == 50
    assert "the plan has 51 steps, more than the 50 allowed" in feedback(openai_server)


async def test_max_steps_comes_from_the_config(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(steps(4))
    openai_server.queue(steps(3))
    plan = await plan_with(make_run(openai_server.base_url, extra={"planner": {"max_steps": 3}}))
    assert len(plan.steps) == 3
    assert "the plan has 4 steps, more than the 3 allowed" in feedback(openai_server)


# --- usage a server reports ------------------------------------------------------------


async def test_negative_usage_never_adds_money_to_the_budget(
    openai_server: ScriptedOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    openai_server.queue(GOOD_PLAN, usage=(-50_000_000, 10))
    run = make_run(openai_server.base_url)
    with caplog.at_level(logging.WARNING, logger="agentkeel.models.completion"):
        await plan_with(run)
    [record] = run.costs
    bound = bound_of(openai_server.requests[0])
    # An impossible count is billed at its bound (what was reserved); the other count is kept.
    assert record.usage is not None and (record.usage.input_tokens, record.usage.output_tokens) == (bound, 10)
    assert record.estimated
    assert record.cost_usd == pytest.approx((bound * FAST["input_per_mtok"] + 10 * FAST["output_per_mtok"]) / 1e6)
    assert record.cost_usd > 0 and run.budget.spent_usd == pytest.approx(record.cost_usd)
    assert run.budget.remaining_usd < run.budget.limit_usd
    assert "prompt_tokens -50000000 is negative" in caplog.text


async def test_negative_completion_tokens_are_billed_at_max_tokens(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(GOOD_PLAN, usage=(100, -3))
    run = make_run(openai_server.base_url)
    await plan_with(run)
    [record] = run.costs
    assert record.usage is not None and (record.usage.input_tokens, record.usage.output_tokens) == (100, 500)
    assert record.estimated


@pytest.mark.parametrize("absurd", ["prompt", "completion"])
async def test_absurd_usage_is_clamped_to_the_reservation_and_marked_estimated(
    openai_server: ScriptedOpenAIServer, caplog: pytest.LogCaptureFixture, absurd: str
) -> None:
    usage = (5_000_000, 10) if absurd == "prompt" else (100, 5_000_000)
    openai_server.queue(GOOD_PLAN, usage=usage)
    run = make_run(openai_server.base_url)
    with caplog.at_level(logging.WARNING, logger="agentkeel.models.completion"):
        await plan_with(run)
    [record] = run.costs
    bound = bound_of(openai_server.requests[0])
    worst = (bound * FAST["input_per_mtok"] + 500 * FAST["output_per_mtok"]) / 1e6  # what was reserved
    assert record.usage is not None
    if absurd == "prompt":
        assert (record.usage.input_tokens, record.usage.output_tokens) == (bound, 10)
        assert "prompt_tokens 5000000 is more than the request can have used" in caplog.text
    else:
        assert (record.usage.input_tokens, record.usage.output_tokens) == (100, 500)
        assert "completion_tokens 5000000 is more than max_tokens (500)" in caplog.text
    assert record.estimated
    assert 0 < record.cost_usd <= worst
    assert run.budget.spent_usd == pytest.approx(record.cost_usd) and run.budget.reserved_usd == pytest.approx(0)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt_tokens": "12", "completion_tokens": 5},
        {"prompt_tokens": 12.5, "completion_tokens": 5},
        {"prompt_tokens": True, "completion_tokens": 5},
        {"completion_tokens": 5},
    ],
)
async def test_usage_that_is_not_a_whole_number_is_billed_at_its_bound(
    openai_server: ScriptedOpenAIServer, body: dict[str, Any]
) -> None:
    openai_server.queue(GOOD_PLAN, usage_body=body)
    run = make_run(openai_server.base_url)
    await plan_with(run)
    [record] = run.costs
    assert record.usage is not None
    assert (record.usage.input_tokens, record.usage.output_tokens) == (bound_of(openai_server.requests[0]), 5)
    assert record.estimated


async def test_usage_within_its_bounds_is_billed_exactly(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(GOOD_PLAN, usage=(0, 500))  # zero and exactly max_tokens are possible
    run = make_run(openai_server.base_url)
    await plan_with(run)
    [record] = run.costs
    assert record.usage is not None and (record.usage.input_tokens, record.usage.output_tokens) == (0, 500)
    assert not record.estimated


# --- deadlines -----------------------------------------------------------------------


async def test_a_retry_after_longer_than_the_deadline_ends_the_tier_at_its_deadline(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_error(429, retry_after=20)
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url, timeout_s=2)  # the client's default max_retries (2) apply
    started = time.monotonic()
    plan = await plan_with(run)
    elapsed = time.monotonic() - started
    assert 1.8 <= elapsed < 4.0, elapsed
    assert plan.planner == "llm:strong"
    assert [r["model"] for r in openai_server.requests] == ["m-fast", "m-strong"]
    # The fast tier only ever got a 429: nothing to pay for it.
    assert [c.tier for c in run.costs] == ["strong"]
    assert run.budget.reserved_usd == pytest.approx(0.0)


async def test_every_tier_past_its_deadline_fails_cleanly_in_bounded_time(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_error(429, retry_after=20)
    openai_server.queue_error(429, retry_after=20)
    run = make_run(openai_server.base_url, timeout_s=1)
    started = time.monotonic()
    with pytest.raises(PlanningError, match="every LLM tier failed") as failed:
        await plan_with(run)
    assert time.monotonic() - started < 3.5
    assert "m-fast did not answer within its 1 s deadline" in str(failed.value)
    assert "m-strong did not answer within its 1 s deadline" in str(failed.value)
    assert run.costs == [] and run.budget.spent_usd == 0.0
    assert run.budget.reserved_usd == pytest.approx(0.0)


async def test_a_tier_may_set_its_own_deadline(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue_error(429, retry_after=20)
    openai_server.queue(GOOD_PLAN)
    tiers = [{"name": "fast", "model": "m-fast", "max_tokens": 500, "timeout_s": 0.5},
             {"name": "strong", "model": "m-strong", "max_tokens": 1000}]
    run = make_run(openai_server.base_url, extra={"models": {
        "base_url": openai_server.base_url, "timeout_s": 60, "tiers": tiers}})
    started = time.monotonic()
    plan = await plan_with(run)
    assert time.monotonic() - started < 2.0
    assert plan.planner == "llm:strong"


async def test_a_slow_answer_past_the_deadline_is_billed_at_the_worst_case(
    openai_server: ScriptedOpenAIServer,
) -> None:
    # Retries allowed: without the overall deadline each attempt could take timeout_s.
    openai_server.queue_slow(3.0, GOOD_PLAN)
    openai_server.queue_slow(3.0, GOOD_PLAN)
    run = make_run(openai_server.base_url, timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(PlanningError):
        await plan_with(run)
    assert time.monotonic() - started < 2.5
    # The server may have processed what it was sent: each tier is billed at its worst case.
    assert [(c.tier, c.estimated) for c in run.costs] == [("fast", True), ("strong", True)]


async def test_an_invalid_max_retries_is_a_config_error(openai_server: ScriptedOpenAIServer) -> None:
    run = make_run(openai_server.base_url, extra={"plugins": {"planner_llm": {"max_retries": -1}}})
    with pytest.raises(ConfigError, match=r"plugins\.planner_llm\.max_retries: must be an integer >= 0"):
        await plan_with(run)
    assert openai_server.requests == []
