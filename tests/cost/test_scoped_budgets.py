"""Budgets per session, per user and day, per principal and month, end to end: the
ledger is the count, across requests, processes and crashes."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, hookimpl, tool
from agentkeel.config import Config
from agentkeel.cost.sqlite_store import SQLiteBudgetStore
from agentkeel.errors import ConfigError
from agentkeel.testing import ScriptedPlanner, make_system

PRICE = 0.01


@tool(permissions=["x"], idempotent=True, cost_usd=PRICE)
def paid(n: int) -> dict[str, Any]:
    """A tool that costs a cent a call."""
    return {"n": n}


@tool(permissions=["x"], idempotent=True, cost_usd=PRICE, timeout=60.0)
def paid_and_stuck(gate: str) -> dict[str, Any]:
    """A priced tool that waits until ``gate`` exists (the test kills its process first)."""
    Path(gate + ".started").write_text("")
    while not os.path.exists(gate):
        time.sleep(0.01)
    return {"ok": True}


@tool(permissions=["x"], requires_approval=True, cost_usd=PRICE)
async def paid_after_approval(n: int) -> dict[str, Any]:
    """A priced tool that waits for an approval."""
    return {"n": n}


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (paid, paid_and_stuck, paid_after_approval):
            register(fn)


def wire(tool_name: str = "paid", **args: Any) -> dict[str, Any]:
    return {"reasoning": "", "steps": [{"description": "", "tool_name": tool_name, "tool_args": args or {"n": 1}}]}


def system(budget: dict[str, Any], plan: dict[str, Any] | None = None, **config: Any) -> Any:
    principals = config.pop("principals", {"ann": {"permissions": ["x"]}, "bob": {"permissions": ["x", "approve"]}})
    return make_system(Tools(), ScriptedPlanner(plan or wire()),
                       config={"principals": principals, "budget": budget, **config})


def ledger_total(home: Path, user: str | None = None) -> float:
    with sqlite3.connect(home / "agentkeel.db") as db:
        query = "SELECT COALESCE(SUM(cost_usd), 0) FROM ledger" + (" WHERE user_id = ?" if user else "")
        return float(db.execute(query, (user,) if user else ()).fetchone()[0])


def test_a_session_budget_refuses_the_request_before_planning_and_names_the_scope(isolated_home: Path) -> None:
    with system({"per_session_usd": 0.03}) as sys_:
        done = [sys_.run_sync(AgentRequest(message="go", user_id="ann", session_id="s1")) for _ in range(4)]
        other = sys_.run_sync(AgentRequest(message="go", user_id="ann", session_id="s2"))
    assert [r.status for r in done] == [RunStatus.SUCCEEDED] * 3 + [RunStatus.BUDGET_EXHAUSTED]
    assert "per_session_usd of session 's1' of user 'ann' ($0.0300) is used up" in done[3].message
    assert "nothing was planned or run" in done[3].message
    assert done[3].plan is None  # refused before the planner ran
    assert other.status is RunStatus.SUCCEEDED  # another session has its own budget
    assert ledger_total(isolated_home) == pytest.approx(0.04)


def test_a_daily_budget_counts_every_session_and_says_when_it_resets(isolated_home: Path) -> None:
    with system({"per_user_daily_usd": 0.02, "timezone": "Europe/Berlin"}) as sys_:
        first = sys_.run_sync(AgentRequest(message="go", user_id="ann", session_id="a"))
        second = sys_.run_sync(AgentRequest(message="go", user_id="ann", session_id="b"))
        third = sys_.run_sync(AgentRequest(message="go", user_id="ann", session_id="c"))
        bob = sys_.run_sync(AgentRequest(message="go", user_id="bob"))
    assert [first.status, second.status, third.status] == [RunStatus.SUCCEEDED] * 2 + [RunStatus.BUDGET_EXHAUSTED]
    assert "per_user_daily_usd of user 'ann'" in third.message and "it resets at" in third.message
    assert bob.status is RunStatus.SUCCEEDED
    assert "I stopped because the budget ran out" in third.answer


def test_a_principal_sets_its_own_limit() -> None:
    principals = {"ann": {"permissions": ["x"], "budget": {"per_user_daily_usd": 0.01}},
                  "bob": {"permissions": ["x"]}}
    with system({"per_user_daily_usd": 1.0}, principals=principals) as sys_:
        ann = [sys_.run_sync(AgentRequest(message="go", user_id="ann")).status for _ in range(2)]
        bob = [sys_.run_sync(AgentRequest(message="go", user_id="bob")).status for _ in range(2)]
    assert ann == [RunStatus.SUCCEEDED, RunStatus.BUDGET_EXHAUSTED]
    assert bob == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]


def test_a_tool_the_scope_cannot_afford_is_not_called() -> None:
    plan = {"reasoning": "", "steps": [{"description": "", "tool_name": "paid", "tool_args": {"n": i}}
                                       for i in range(3)]}
    with system({"per_session_usd": 0.025}, plan) as sys_:
        response = sys_.run_sync(AgentRequest(message="go", user_id="ann"))
    assert response.status is RunStatus.BUDGET_EXHAUSTED
    assert [s.status.value for s in response.steps] == ["succeeded", "succeeded", "failed"]
    assert "per_session_usd of session 'default' of user 'ann'" in (response.steps[2].error or "")


def test_a_resumed_run_counts_what_the_ledger_holds_for_it(openai_server_env: Any, isolated_home: Path) -> None:
    server = openai_server_env
    seen: list[float] = []

    class Spy:
        @hookimpl(wrapper=True)
        def agentkeel_call_tool(self, run: Any) -> Any:
            seen.append(run.budget.spent_usd)
            return (yield)

    plan = {"reasoning": "", "steps": [
        {"description": "", "tool_name": "paid", "tool_args": {"n": 1}},
        {"description": "", "tool_name": "paid_after_approval", "tool_args": {"n": 2}}]}
    server.queue(plan, usage=(1000, 100))
    config = {"principals": {"ann": {"permissions": ["x"]}, "bob": {"permissions": ["x", "approve"]}},
              "models": {"tiers": [{"name": "fast", "model": "m"}]},
              "prices": {"m": {"input_per_mtok": 10.0, "output_per_mtok": 20.0}},
              "responder": {"mode": "template"}}
    planning = (1000 * 10.0 + 100 * 20.0) / 1e6
    with make_system(Tools(), Spy(), config=config) as sys_:
        waiting = sys_.run_sync(AgentRequest(message="go", user_id="ann", budget_usd=1.0))
        assert waiting.status is RunStatus.WAITING
        sys_.decide(waiting.run_id, 2, approver="bob", approved=True)
    with make_system(Tools(), Spy(), config=config) as sys_:  # another process, after a restart
        done = sys_.resume_sync(waiting.run_id)
        rows = sys_.ledger(run_id=waiting.run_id)
    assert done.status is RunStatus.SUCCEEDED
    assert seen[0] == pytest.approx(planning)  # the first run: the planning call was spent
    assert seen[-1] == pytest.approx(planning + PRICE)  # the resumed run: planning and step 1, from the ledger
    assert [(r.kind, r.purpose, r.reason) for r in rows] == [
        ("llm", "plan", "first_tier"), ("tool", "tool", "tool"), ("tool", "tool", "tool")]
    assert rows[0].input_tokens == 1000 and rows[0].output_tokens == 100 and rows[0].tier == "fast"


def test_budget_configuration_is_checked() -> None:
    for budget in ({"per_user_daily_usd": -1}, {"per_session_usd": "lots"}, {"timezone": "Nowhere/Land"},
                   {"per_principal_monthly_usd": True}, {"reservation_ttl_s": 0}):
        with pytest.raises(ConfigError, match="budget"):
            Config.from_dict({"budget": budget})
    with pytest.raises(ConfigError, match="nan"):
        Config.from_dict({"budget": {"per_user_daily_usd": float("nan")}})
    with pytest.raises(ConfigError, match=r"principals\.ann\.budget"):
        Config.from_dict({"principals": {"ann": {"permissions": [], "budget": {"per_session_usd": -0.5}}}})


# --- across processes -------------------------------------------------------------------------------


def _serve_many(home: str, shop: str, count: int, out: str) -> None:
    os.environ["AGENTKEEL_HOME"] = home
    os.environ["AGENTKEEL_SHOP_DB"] = shop

    async def main() -> list[dict[str, Any]]:
        async with system({"per_user_daily_usd": 0.05}) as sys_:
            responses = await asyncio.gather(*(
                sys_.run(AgentRequest(message="go", user_id="ann", session_id=f"s{i}")) for i in range(count)))
        return [{"status": r.status.value, "message": r.message,
                 "errors": [s.error for s in r.steps if s.error]} for r in responses]

    Path(out).write_text(json.dumps(asyncio.run(main())))


def test_two_hundred_concurrent_requests_from_two_processes_never_overspend_a_daily_budget(
    isolated_home: Path, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"out{i}.json") for i in range(2)]
    procs = [ctx.Process(target=_serve_many, args=(str(isolated_home), str(tmp_path / "shop.db"), 100, out))
             for out in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    answers = [a for out in outs for a in json.loads(Path(out).read_text())]
    assert len(answers) == 200
    spent = ledger_total(isolated_home, "ann")
    assert spent <= 0.05 + 1e-9
    assert spent == pytest.approx(0.05)  # the budget was used, not just refused
    ok = [a for a in answers if a["status"] == "succeeded"]
    refused = [a for a in answers if a["status"] == "budget_exhausted"]
    assert len(ok) == 5 and len(refused) == 195
    for a in refused:
        assert "per_user_daily_usd of user 'ann'" in a["message"] + " ".join(a["errors"]), a


def _stuck_run(home: str, shop: str, gate: str) -> None:
    os.environ["AGENTKEEL_HOME"] = home
    os.environ["AGENTKEEL_SHOP_DB"] = shop
    with system({"per_user_daily_usd": 0.015, "reservation_ttl_s": 1.0}, wire("paid_and_stuck", gate=gate)) as s:
        s.run_sync(AgentRequest(message="go", user_id="ann"))


def test_a_reservation_of_a_killed_process_expires_and_leaves_no_spend(isolated_home: Path, tmp_path: Path) -> None:
    gate = str(tmp_path / "gate")
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_stuck_run, args=(str(isolated_home), str(tmp_path / "shop.db"), gate))
    proc.start()
    deadline = time.monotonic() + 60
    while not os.path.exists(gate + ".started"):
        assert time.monotonic() < deadline and proc.is_alive()
        time.sleep(0.01)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)  # between the reservation and its settlement
    proc.join()
    with system({"per_user_daily_usd": 0.015, "reservation_ttl_s": 1.0}) as sys_:
        held = sys_.run_sync(AgentRequest(message="go", user_id="ann"))
        # the dead process's cent is still held: one more cent does not fit in 1.5 cents
        assert held.status is RunStatus.BUDGET_EXHAUSTED, held.message
        time.sleep(1.2)
        freed = sys_.run_sync(AgentRequest(message="go", user_id="ann"))
    assert freed.status is RunStatus.SUCCEEDED, freed.message
    assert ledger_total(isolated_home) == pytest.approx(PRICE)  # only the call that ran; no phantom spend
    store = SQLiteBudgetStore(isolated_home)
    try:
        assert len(store.entries(user_id="ann")) == 1
    finally:
        store.close()


# --- cached and reasoning tokens ------------------------------------------------------------------


def test_cached_input_is_priced_as_cached_and_reasoning_tokens_are_recorded(openai_server_env: Any) -> None:
    server = openai_server_env
    server.queue(wire(), usage_body={"prompt_tokens": 1000, "completion_tokens": 300, "total_tokens": 1300,
                                     "prompt_tokens_details": {"cached_tokens": 800},
                                     "completion_tokens_details": {"reasoning_tokens": 200}})
    config = {"principals": {"ann": {"permissions": ["x"]}},
              "models": {"tiers": [{"name": "fast", "model": "m"}]},
              "prices": {"m": {"input_per_mtok": 10.0, "output_per_mtok": 40.0, "cached_input_per_mtok": 1.0}},
              "responder": {"mode": "template"}}
    with make_system(Tools(), config=config) as sys_:
        response = sys_.run_sync(AgentRequest(message="go", user_id="ann"))
        [planning, _tool] = sys_.ledger(run_id=response.run_id)
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert (planning.cached_tokens, planning.reasoning_tokens) == (800, 200)
    assert planning.cost_usd == pytest.approx((200 * 10.0 + 800 * 1.0 + 300 * 40.0) / 1e6)


def test_a_price_table_model_has_its_cached_price() -> None:
    from agentkeel.cost.pricing import price_from_table
    from agentkeel.types import ModelPrice, Usage

    price = price_from_table("gpt-4o-mini")
    assert price is not None and price.cached_input_per_mtok is not None
    assert price.cached_input_per_mtok < price.input_per_mtok
    assert ModelPrice(1.0, 2.0).cost(Usage(1000, 10, cached_tokens=5000)) == pytest.approx((1000 + 20) / 1e6)
    with pytest.raises(ConfigError, match="cached_input_per_mtok"):
        Config.from_dict({"prices": {"m": {"input_per_mtok": 1, "output_per_mtok": 1, "cached_input_per_mtok": -1}}})
