"""The LLM planner end to end: the real openai client, over real HTTP, against the
scripted server; the plan then runs the demo plugin's tools on its SQLite shop, and
the LLM responder writes the answer (one more call, on the cheapest tier)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agentkeel import AgentRequest, Config, RunStatus, StepStatus
from agentkeel.runtime.system import AgentSystem
from agentkeel.testing.server import ScriptedOpenAIServer

CONFIG = {
    "principals": {"agent-42": {"permissions": ["read", "refunds"]}},
    "models": {"tiers": [{"name": "fast", "model": "gpt-4o-mini", "max_tokens": 512},
                         {"name": "strong", "model": "gpt-4o", "max_tokens": 512}]},
}

LLM_PLAN = {
    "reasoning": "look the order up, refund it if it shipped",
    "steps": [
        {"description": "look up", "tool_name": "lookup_order", "tool_args": {"order_id": "1003"}},
        {"description": "refund", "tool_name": "issue_refund",
         "tool_args": {"order_id": "1003", "amount": {"$ref": "/1/total"}},
         "when": {"ref": "/1/status", "op": "in", "value": ["shipped", "delivered"]}},
    ],
}


def refund_rows() -> list[Any]:
    with sqlite3.connect(os.environ["AGENTKEEL_SHOP_DB"]) as db:
        return db.execute("SELECT order_id, amount FROM refunds").fetchall()


ANSWER = "Order 1003 was delivered, so I refunded its $120.00 total."


async def test_llm_plan_runs_and_is_priced(openai_server_env: ScriptedOpenAIServer) -> None:
    openai_server_env.queue(LLM_PLAN, usage=(1200, 150))
    openai_server_env.queue(ANSWER, usage=(800, 20))  # the LLM responder
    async with AgentSystem(Config.from_dict(CONFIG)) as system:
        response = await system.run(AgentRequest(message="please sort out order 1003", user_id="agent-42"))
        visible = sorted(system.visible_tools(system.config.principals["agent-42"]))
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.plan is not None and response.plan.planner == "llm:fast"
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
    assert refund_rows() == [("1003", 120.0)]
    assert (response.answer, response.answer_source) == (ANSWER, "llm:fast")
    # gpt-4o-mini from the genai-prices table: $0.15 / $0.60 per million tokens.
    planning, answering = response.costs
    assert planning.cost_usd == (1200 * 0.15 + 150 * 0.60) / 1e6
    assert answering.cost_usd == (800 * 0.15 + 20 * 0.60) / 1e6
    assert response.total_cost_usd == pytest.approx(planning.cost_usd + answering.cost_usd)
    assert response.cost_breakdown()["by_tier"] == {"fast": pytest.approx(response.total_cost_usd)}
    assert openai_server_env.requests[1]["max_tokens"] == 512 and "response_format" not in openai_server_env.requests[1]
    sent = openai_server_env.requests[0]
    assert sent["model"] == "gpt-4o-mini"
    offered = sent["response_format"]["json_schema"]["schema"]["properties"]["steps"]["items"]
    assert sorted(offered["properties"]["tool_name"]["enum"]) == visible
    assert {"cancel_refund", "check_inventory", "issue_refund", "lookup_order"} <= set(visible)
    assert "send_email" not in visible  # send_email needs "email", which agent-42 does not hold


async def test_hallucinating_model_is_repaired_then_escalated(openai_server_env: ScriptedOpenAIServer) -> None:
    bad = {"reasoning": "x", "steps": [{"description": "d", "tool_name": "wire_money", "tool_args": {}}]}
    openai_server_env.queue(bad)
    openai_server_env.queue(bad)  # the repair round fails too: escalate
    openai_server_env.queue(LLM_PLAN)
    openai_server_env.queue(ANSWER)
    async with AgentSystem(Config.from_dict(CONFIG)) as system:
        response = await system.run(AgentRequest(message="sort out order 1003", user_id="agent-42"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    # the planner escalated; the responder answers on the cheapest tier
    assert [r["model"] for r in openai_server_env.requests] == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o",
                                                                 "gpt-4o-mini"]
    assert response.plan is not None and response.plan.planner == "llm:strong"
    assert set(response.cost_breakdown()["by_tier"]) == {"fast", "strong"}


async def test_every_tier_hallucinating_runs_nothing(openai_server_env: ScriptedOpenAIServer) -> None:
    bad = {"reasoning": "x", "steps": [{"description": "d", "tool_name": "wire_money", "tool_args": {}}]}
    for _ in range(4):
        openai_server_env.queue(bad)
    openai_server_env.queue_error(500)  # the responder's call fails: the deterministic answer, noted
    async with AgentSystem(Config.from_dict(CONFIG)) as system:
        response = await system.run(AgentRequest(message="sort out order 1003", user_id="agent-42"))
        # A refused request is journaled too, with what planning it cost.
        shown = system.show(response.run_id)
        [listed] = [r for r in system.runs() if r.run_id == response.run_id]
    assert response.status is RunStatus.REJECTED
    assert "wire_money" in response.message
    assert not Path(os.environ["AGENTKEEL_SHOP_DB"]).exists()  # no tool touched the shop
    assert len(response.costs) == 4 and response.total_cost_usd > 0  # the failed answer call is not billed
    assert response.answer_source == "template (LLM unavailable)" and "the call to it failed" in response.answer
    assert shown.status is RunStatus.REJECTED and shown.steps == ()
    assert shown.total_cost_usd == listed.planning_cost_usd == response.total_cost_usd


def test_cli_with_llm_planner_in_a_subprocess(openai_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    openai_server.queue(LLM_PLAN, usage=(900, 100))
    openai_server.queue(ANSWER, usage=(700, 20))
    config = tmp_path / "agentkeel.toml"
    config.write_text(
        '[principals.agent-42]\npermissions = ["read", "refunds"]\n\n'
        '[[models.tiers]]\nname = "fast"\nmodel = "gpt-4o-mini"\n'
    )
    env = {**os.environ, "OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}
    proc = subprocess.run(
        [sys.executable, "-m", "agentkeel", "run", "sort out order 1003", "--user", "agent-42",
         "--config", str(config), "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["plan"]["planner"] == "llm:fast"
    assert out["total_cost_usd"] == pytest.approx(((900 + 700) * 0.15 + (100 + 20) * 0.60) / 1e6)
    assert out["cost_breakdown"]["by_tier"]["fast"] == pytest.approx(out["total_cost_usd"])
    assert (out["answer"], out["answer_source"]) == (ANSWER, "llm:fast")
    assert refund_rows() == [("1003", 120.0)]


async def test_a_model_proposing_a_tool_the_principal_may_not_call_is_audited(
    openai_server_env: ScriptedOpenAIServer,
) -> None:
    """The planner's own validation refuses send_email (agent-42 lacks "email"): that refusal,
    made before any permission check of the plan, is an audit record naming principal and tool."""
    sneaky = {"reasoning": "x", "steps": [{"description": "d", "tool_name": "send_email",
                                           "tool_args": {"to": "a@example.com", "subject": "s", "body": "b"}}]}
    for _ in range(4):
        openai_server_env.queue(sneaky)
    openai_server_env.queue("I could not plan that: sending email is not something you may do.")
    async with AgentSystem(Config.from_dict(CONFIG)) as system:
        response = await system.run(AgentRequest(message="email the customer", user_id="agent-42"))
        home = system.config.home
    assert response.status is not RunStatus.SUCCEEDED
    lines = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    refusals = [r for r in lines if r.get("tool") == "send_email" and r.get("decision") == "deny"]
    assert refusals and all(r["principal"] == "agent-42" and r["run_id"] == response.run_id for r in refusals)
    assert "may not call" in refusals[0]["reason"]
