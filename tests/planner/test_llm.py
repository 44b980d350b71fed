"""The default LLM planner against the scripted server: real openai client, real HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from typing import Any

import pluggy
import pytest
from agentkeel import hookspecs
from agentkeel.config import Config
from agentkeel.context import RunContext
from agentkeel.cost import pricing
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.errors import BudgetExceededError, ConfigError, PlanningError, PlanRejectedError
from agentkeel.markers import PROJECT_NAME
from agentkeel.planner.llm import LLMPlanner, plan_with_tiers
from agentkeel.plugin.facade import Plugins
from agentkeel.plugin.manager import LoadedPlugins
from agentkeel.testing.server import ScriptedOpenAIServer
from agentkeel.tools.decorator import spec_of, tool
from agentkeel.types import AgentRequest, CostRecord, MemoryContext, Principal, ToolSpec, Usage


@tool(description="Look an order up by id.", allow_uncancellable=True)
def lookup_order(order_id: str) -> dict[str, Any]:
    return {"order_id": order_id, "status": "shipped", "total": 10.0}


@tool(description="Refund an order.", allow_uncancellable=True)
def issue_refund(order_id: str, amount: float) -> dict[str, Any]:
    return {"refund_id": "r1"}


@tool(description="Delete every customer record.", allow_uncancellable=True)
def wipe_database() -> None:
    return None


TOOLS: dict[str, ToolSpec] = {
    spec.name: spec for spec in (spec_of(lookup_order), spec_of(issue_refund)) if spec is not None
}

GOOD_PLAN = {
    "reasoning": "look the order up, refund it if shipped",
    "steps": [
        {
            "description": "find the order",
            "tool_name": "lookup_order",
            "tool_args": {"order_id": "1001"},
        },
        {
            "description": "refund it",
            "tool_name": "issue_refund",
            "tool_args": {"order_id": "1001", "amount": {"$ref": "/1/total"}},
            "when": {"ref": "/1/status", "op": "eq", "value": "shipped"},
        },
    ],
}
HALLUCINATED_PLAN = {
    "reasoning": "r",
    "steps": [{"description": "d", "tool_name": "delete_everything", "tool_args": {}}],
}

# USD per million tokens: chosen so every cost below is exact.
FAST = {"input_per_mtok": 1.0, "output_per_mtok": 4.0}
STRONG = {"input_per_mtok": 10.0, "output_per_mtok": 40.0}


def make_run(
    base_url: str | None,
    *,
    budget_usd: float = 1.0,
    extra: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    message: str = "refund order 1001 if it shipped",
) -> RunContext:
    models: dict[str, Any] = {
        "tiers": [
            {"name": "fast", "model": "m-fast", "max_tokens": 500},
            {"name": "strong", "model": "m-strong", "max_tokens": 1000},
        ]
    }
    if base_url is not None:
        models["base_url"] = base_url
    if timeout_s is not None:
        models["timeout_s"] = timeout_s
    data: dict[str, Any] = {
        "models": models,
        "prices": {"m-fast": FAST, "m-strong": STRONG},
        **(extra or {}),
    }
    config = Config.from_dict(data, "<test>")
    request = AgentRequest(message=message, user_id="tester")
    return RunContext(
        request=request,
        principal=Principal("tester"),
        config=config,
        budget=Budget(budget_usd),
        pricer=Pricer(price_lookup(), config),
    )


def price_lookup() -> Any:
    """``agentkeel_model_price`` as the host calls it, with only the pricing plugin loaded."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(pricing, name="agentkeel.cost.pricing")
    return Plugins(LoadedPlugins(pm)).model_price


async def plan_with(
    run: RunContext,
    context: MemoryContext | None = None,
    tools: Mapping[str, ToolSpec] = TOOLS,
    planner: LLMPlanner | None = None,
) -> Any:
    """Call the planner's hook as the host does (a fresh planner: a fresh system)."""
    planner = planner or LLMPlanner()
    return await planner.agentkeel_plan(
        request=run.request, context=context or MemoryContext(), tools=tools, run=run
    )


def no_retries() -> dict[str, Any]:
    return {"plugins": {"planner_llm": {"max_retries": 0}}}


async def test_valid_plan(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(GOOD_PLAN, usage=(900, 120))
    run = make_run(openai_server.base_url)
    context = MemoryContext(
        turns=({"role": "user", "content": "my name is Ada"},), facts=("prefers email",)
    )
    plan = await plan_with(run, context)
    assert plan.planner == "llm:fast"
    assert [s.tool_name for s in plan.steps] == ["lookup_order", "issue_refund"]
    assert plan.steps[1].depends_on == frozenset({1})
    [body] = openai_server.requests
    assert body["model"] == "m-fast"
    assert body["max_tokens"] == 500
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "plan"
    tool_name = fmt["json_schema"]["schema"]["properties"]["steps"]["items"]["properties"][
        "tool_name"
    ]
    assert tool_name == {"enum": ["issue_refund", "lookup_order"]}
    system, user = body["messages"]
    assert user == {"role": "user", "content": "refund order 1001 if it shipped"}
    assert "lookup_order: Look an order up by id." in system["content"]
    assert '"order_id"' in system["content"] and "$ref" in system["content"]
    assert "my name is Ada" in system["content"] and "prefers email" in system["content"]
    assert "wipe_database" not in system["content"]


async def test_only_the_given_tools_are_shown(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue({"reasoning": "nothing to do", "steps": []})
    run = make_run(openai_server.base_url)
    only = {"lookup_order": TOOLS["lookup_order"]}
    plan = await plan_with(run, tools=only)
    assert plan.steps == ()
    system = openai_server.requests[0]["messages"][0]["content"]
    assert "lookup_order" in system and "issue_refund" not in system


async def test_json_schema_unsupported_falls_back_to_json_object_and_remembers() -> None:
    with ScriptedOpenAIServer(supports_json_schema=False) as server:
        server.queue(GOOD_PLAN, usage=(100, 10))
        server.queue(GOOD_PLAN, usage=(100, 10))
        server.queue(GOOD_PLAN, usage=(100, 10))
        run = make_run(server.base_url)
        planner = LLMPlanner()  # one per system: what it learns stays with it
        assert (await plan_with(run, planner=planner)).planner == "llm:fast"
        assert planner.no_json_schema == {server.base_url + "/"}
        assert (await plan_with(run, planner=planner)).planner == "llm:fast"
        formats = [r["response_format"]["type"] for r in server.requests]
        assert formats == ["json_schema", "json_object", "json_object"]
        # the refused call was released, not billed
        assert run.budget.spent_usd == pytest.approx(2 * (100 * 1.0 + 10 * 4.0) / 1e6)
        assert run.budget.reserved_usd == pytest.approx(0.0)
        # Another system's planner has learnt nothing: it asks for json_schema again.
        assert (await plan_with(run, planner=LLMPlanner())).planner == "llm:fast"
        formats = [r["response_format"]["type"] for r in server.requests]
        assert formats[3:] == ["json_schema", "json_object"]


async def test_invalid_json_gets_one_repair_round(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue('{"reasoning": "oops", "steps": [')
    openai_server.queue(GOOD_PLAN)
    plan = await plan_with(make_run(openai_server.base_url))
    assert plan.planner == "llm:fast"
    assert len(openai_server.requests) == 2
    repair = openai_server.requests[1]["messages"]
    assert repair[:2] == openai_server.requests[0]["messages"]
    assert repair[2] == {"role": "assistant", "content": '{"reasoning": "oops", "steps": ['}
    assert repair[3]["role"] == "user" and "not valid JSON" in repair[3]["content"]


async def test_hallucinated_tool_triggers_repair(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue(HALLUCINATED_PLAN)
    openai_server.queue(GOOD_PLAN)
    plan = await plan_with(make_run(openai_server.base_url))
    assert "delete_everything" not in {s.tool_name for s in plan.steps}
    feedback = openai_server.requests[1]["messages"][-1]["content"]
    assert "'delete_everything' is not available" in feedback
    assert "issue_refund, lookup_order" in feedback


async def test_missing_argument_and_forward_reference_trigger_repair(
    openai_server: ScriptedOpenAIServer,
) -> None:
    bad = {
        "reasoning": "r",
        "steps": [
            {
                "description": "d",
                "tool_name": "issue_refund",
                "tool_args": {"order_id": {"$ref": "/2/id"}},
            },
            {"description": "d", "tool_name": "lookup_order", "tool_args": {"order_id": "1"}},
        ],
    }
    openai_server.queue(bad)
    openai_server.queue(GOOD_PLAN)
    await plan_with(make_run(openai_server.base_url))
    feedback = openai_server.requests[1]["messages"][-1]["content"]
    assert "missing required argument(s) amount" in feedback
    assert "only refer to earlier steps" in feedback


async def test_every_tier_invalid_is_rejected_with_all_reasons(
    openai_server: ScriptedOpenAIServer,
) -> None:
    for _ in range(4):
        openai_server.queue(HALLUCINATED_PLAN)
    with pytest.raises(PlanRejectedError) as rejected:
        await plan_with(make_run(openai_server.base_url))
    assert [r["model"] for r in openai_server.requests] == [
        "m-fast",
        "m-fast",
        "m-strong",
        "m-strong",
    ]
    reasons = rejected.value.reasons
    assert len(reasons) == 2
    assert reasons[0].startswith("tier 'fast' (m-fast)") and reasons[1].startswith(
        "tier 'strong' (m-strong)"
    )
    assert all("delete_everything" in r for r in reasons)


async def test_cascade_escalates_to_the_next_tier(openai_server: ScriptedOpenAIServer) -> None:
    openai_server.queue("I cannot produce JSON", usage=(100, 10))
    openai_server.queue(HALLUCINATED_PLAN, usage=(200, 20))
    openai_server.queue(GOOD_PLAN, usage=(300, 30))
    run = make_run(openai_server.base_url)
    plan = await plan_with(run)
    assert plan.planner == "llm:strong"
    assert [r["model"] for r in openai_server.requests] == ["m-fast", "m-fast", "m-strong"]
    assert openai_server.requests[2]["max_tokens"] == 1000
    # the strong tier starts afresh: no repair turns from the fast tier
    assert len(openai_server.requests[2]["messages"]) == 2
    assert [(c.tier, c.model) for c in run.costs] == [
        ("fast", "m-fast"),
        ("fast", "m-fast"),
        ("strong", "m-strong"),
    ]


async def test_429_with_retry_after_is_retried_once_by_the_client(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_error(429, retry_after=0.05)
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url)
    plan = await plan_with(run)
    assert plan.planner == "llm:fast"
    assert len(openai_server.requests) == 2
    assert len(run.costs) == 1


async def test_no_second_retry_layer(openai_server: ScriptedOpenAIServer) -> None:
    """With the client's retries set to 0, a 429 is not retried by the planner itself."""
    openai_server.queue_error(429, retry_after=0.05)
    openai_server.queue_error(429, retry_after=0.05)
    run = make_run(openai_server.base_url, extra=no_retries())
    with pytest.raises(PlanningError, match="HTTP 429"):
        await plan_with(run)
    # one request per tier: the cascade moves on, nothing re-sends
    assert [r["model"] for r in openai_server.requests] == ["m-fast", "m-strong"]
    assert run.budget.spent_usd == 0.0 and run.budget.reserved_usd == pytest.approx(0.0)


async def test_server_error_on_a_tier_escalates(openai_server: ScriptedOpenAIServer) -> None:
    # A 500 to json_schema is first taken for a server that cannot do it (llama_cpp.server
    # answers so): the tier is asked again in JSON mode. A 500 to that too is a failed tier.
    openai_server.queue_error(500)
    openai_server.queue_error(500)
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url, extra=no_retries())
    plan = await plan_with(run)
    assert plan.planner == "llm:strong"
    assert [(r["model"], r["response_format"]["type"]) for r in openai_server.requests] == [
        ("m-fast", "json_schema"),
        ("m-fast", "json_object"),
        ("m-strong", "json_schema"),
    ]
    # the error answers were released, not billed
    assert run.budget.spent_usd == pytest.approx((100 * 10.0 + 10 * 40.0) / 1e6)
    assert run.budget.reserved_usd == pytest.approx(0.0)


async def test_a_500_to_json_schema_falls_back_to_json_object_and_remembers(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_error(500, message="failed to parse the grammar")
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url, extra=no_retries())
    planner = LLMPlanner()
    assert (await plan_with(run, planner=planner)).planner == "llm:fast"
    assert (await plan_with(run, planner=planner)).planner == "llm:fast"
    formats = [r["response_format"]["type"] for r in openai_server.requests]
    assert formats == ["json_schema", "json_object", "json_object"]
    assert run.budget.spent_usd == pytest.approx(2 * (100 * 1.0 + 10 * 4.0) / 1e6)


async def test_plan_with_tiers_uses_and_fills_the_given_capability_set(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(GOOD_PLAN)
    run = make_run(openai_server.base_url)
    known = {openai_server.base_url + "/"}  # this server is known to lack json_schema
    plan = await plan_with_tiers(run.request, MemoryContext(), TOOLS, run, known)
    assert plan.planner == "llm:fast"
    assert [r["response_format"]["type"] for r in openai_server.requests] == ["json_object"]
    assert known == {openai_server.base_url + "/"}


async def test_usage_is_recorded_and_budget_settled_to_the_real_price(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(GOOD_PLAN, usage=(1000, 250))
    run = make_run(openai_server.base_url)
    await plan_with(run)
    expected = (1000 * 1.0 + 250 * 4.0) / 1e6
    [record] = run.costs
    assert record == CostRecord(
        kind="llm", cost_usd=record.cost_usd, model="m-fast", tier="fast", usage=Usage(1000, 250),
        purpose="plan", reason="first_tier",
    )
    assert record.cost_usd == pytest.approx(expected)
    assert run.budget.spent_usd == pytest.approx(expected)
    assert run.budget.reserved_usd == pytest.approx(0.0)


async def test_unreported_usage_is_charged_at_the_worst_case(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(GOOD_PLAN, report_usage=False)
    run = make_run(openai_server.base_url)
    await plan_with(run)
    [record] = run.costs
    assert record.usage is not None and record.usage.output_tokens == 500
    assert (
        record.usage.input_tokens
        >= len(json.dumps(openai_server.requests[0]["messages"][0]["content"])) // 2
    )
    assert (
        run.budget.spent_usd == pytest.approx(record.cost_usd) and record.cost_usd > 500 * 4.0 / 1e6
    )
    assert record.estimated  # a guess, and marked as one


async def test_timeout_is_charged_at_the_worst_case_and_escalates(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_slow(2.0, GOOD_PLAN)
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url, extra=no_retries(), timeout_s=0.3)
    plan = await plan_with(run)
    assert plan.planner == "llm:strong"
    worst, real = run.costs
    assert worst.tier == "fast" and worst.usage is not None and worst.usage.output_tokens == 500
    assert worst.estimated  # the server may have processed it: billed at the worst case
    assert real.usage == Usage(100, 10)
    assert not real.estimated


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_refused_connection_is_released_not_billed() -> None:
    run = make_run(f"http://127.0.0.1:{free_port()}/v1", extra=no_retries())
    with pytest.raises(PlanningError, match="every LLM tier failed") as failed:
        await plan_with(run)
    assert "m-fast call failed" in str(failed.value) and "m-strong call failed" in str(failed.value)
    # Nothing reached a server on either tier: nothing to pay, nothing left reserved.
    assert run.costs == []
    assert run.budget.spent_usd == 0.0
    assert run.budget.reserved_usd == pytest.approx(0.0)


async def test_an_unreadable_answer_is_billed_at_the_worst_case(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_malformed()  # the server processed the call; its body is cut off
    openai_server.queue(GOOD_PLAN, usage=(100, 10))
    run = make_run(openai_server.base_url, extra=no_retries())
    plan = await plan_with(run)
    assert plan.planner == "llm:strong"
    worst, real = run.costs
    assert (worst.tier, worst.estimated) == ("fast", True)
    assert worst.usage is not None and worst.usage.output_tokens == 500
    assert (real.tier, real.estimated) == ("strong", False)
    assert run.budget.spent_usd == pytest.approx(worst.cost_usd + real.cost_usd)


async def test_budget_too_small_stops_before_any_request(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue(GOOD_PLAN)
    run = make_run(openai_server.base_url, budget_usd=0.0001)
    with pytest.raises(BudgetExceededError, match="m-fast"):
        await plan_with(run)
    assert openai_server.requests == []
    assert run.budget.spent_usd == 0.0


async def test_env_configures_the_endpoint(openai_server_env: ScriptedOpenAIServer) -> None:
    openai_server_env.queue(GOOD_PLAN)
    plan = await plan_with(make_run(None))
    assert plan.planner == "llm:fast"
    assert openai_server_env.request_headers[0]["authorization"] == "Bearer sk-agentkeel-test"


async def test_no_key_and_no_base_url_says_how_to_configure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    # A missing endpoint is the configuration's fault (exit code 2), not a planning failure.
    with pytest.raises(
        ConfigError, match=r"no plan template matched.*OPENAI_API_KEY.*OPENAI_BASE_URL"
    ):
        await plan_with(make_run(None))


async def test_no_tiers_configured_is_a_config_error(openai_server: ScriptedOpenAIServer) -> None:
    run = make_run(openai_server.base_url)
    run = RunContext(
        run.request,
        run.principal,
        Config.from_dict({"models": {"base_url": openai_server.base_url}}, "<test>"),
        run.budget,
        run.pricer,
    )
    with pytest.raises(ConfigError, match=r"no LLM tiers are configured.*\[\[models.tiers\]\]"):
        await plan_with(run)
    assert openai_server.requests == []


async def test_a_400_unrelated_to_json_schema_is_not_remembered(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue_error(400, message="unknown model m-fast")
    openai_server.queue_error(400, message="unknown model m-fast")
    openai_server.queue(GOOD_PLAN)
    plan = await plan_with(make_run(openai_server.base_url))
    assert plan.planner == "llm:strong"
    formats = [r["response_format"]["type"] for r in openai_server.requests]
    assert formats == ["json_schema", "json_object", "json_schema"]


async def test_an_answer_cut_off_at_max_tokens_is_repaired(
    openai_server: ScriptedOpenAIServer,
) -> None:
    openai_server.queue('{"reasoning": "long", "ste', finish_reason="length")
    openai_server.queue(GOOD_PLAN)
    await plan_with(make_run(openai_server.base_url))
    assert "cut off at max_tokens" in openai_server.requests[1]["messages"][-1]["content"]
