"""LLM tokens and cost in the service's metrics: a server whose planner and responder talk
to the scripted OpenAI-compatible server over real HTTP."""

from __future__ import annotations

from pathlib import Path

from agentkeel.server.metrics import metric_value
from agentkeel.testing.server import ScriptedOpenAIServer
from tests.server.conftest import start_server

PLAN = {
    "reasoning": "look the order up",
    "steps": [{"description": "look up", "tool_name": "lookup_order", "tool_args": {"order_id": "1003"}}],
}


def test_llm_tokens_and_cost_by_model_and_tier(tmp_path: Path) -> None:
    with ScriptedOpenAIServer() as llm:
        tiers = ('\n[[models.tiers]]\nname = "fast"\nmodel = "gpt-4o-mini"\nmax_tokens = 512\n'
                 '\n[[models.tiers]]\nname = "strong"\nmodel = "gpt-4o"\nmax_tokens = 512\n')
        server = start_server(tmp_path, extra=tiers,
                              env_extra={"OPENAI_BASE_URL": llm.base_url, "OPENAI_API_KEY": "sk-test"})
        try:
            llm.queue(PLAN, usage=(1200, 150))
            llm.queue("Order 1003 is delivered.", usage=(800, 20))
            with server.client("alice") as alice, server.client("root") as root:
                body = alice.post("/v1/runs/wait", json={"message": "what is up with my order 1003?"}).json()
                assert body["status"] == "succeeded", body
                assert body["answer"] == "Order 1003 is delivered."
                text = root.get("/metrics").text
                costs = {r["key"]: r["cost_usd"] for r in root.get("/v1/costs", params={"by": "model"}).json()}
        finally:
            server.stop()
    tokens_in = metric_value(text, "agentkeel_llm_tokens_total", model="gpt-4o-mini", tier="fast", direction="input")
    tokens_out = metric_value(text, "agentkeel_llm_tokens_total", model="gpt-4o-mini", tier="fast",
                              direction="output")
    assert (tokens_in, tokens_out) == (2000, 170)
    cost = metric_value(text, "agentkeel_cost_usd_total", kind="llm", model="gpt-4o-mini", tier="fast")
    assert cost is not None and abs(cost - costs["gpt-4o-mini"]) < 1e-9  # the metric is the ledger's number
