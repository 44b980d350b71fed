"""Replans, adaptive rounds, optional steps, answers, events and approvals, end to end
through ``AgentSystem`` with the real journal (SQLite under the test's home)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl, tool
from agentkeel.errors import ApprovalError, PlanRejectedError, ToolError
from agentkeel.planner.plan import parse_plan
from agentkeel.testing import ScriptedPlanner, make_system

CALLS: list[tuple[str, dict[str, Any]]] = []


@tool(permissions=["shop"], idempotent=True)
def lookup(order: str) -> dict[str, Any]:
    """Look an order up."""
    CALLS.append(("lookup", {"order": order}))
    return {"order": order, "total": 12.5, "status": "shipped"}


@tool(permissions=["shop"], rollback="uncharge")
def charge(amount: float, idempotency_key: str) -> dict[str, Any]:
    """Charge an amount."""
    CALLS.append(("charge", {"amount": amount}))
    return {"charge_id": idempotency_key, "amount": amount}


@tool(permissions=["shop"], idempotent=True)
def uncharge(charge_id: str) -> dict[str, Any]:
    """Undo a charge."""
    CALLS.append(("uncharge", {"charge_id": charge_id}))
    return {"undone": charge_id}


@tool(permissions=["shop"], allow_uncancellable=True)
def ship_by_truck(order: str) -> dict[str, Any]:
    """The truck is broken."""
    CALLS.append(("ship_by_truck", {"order": order}))
    raise ToolError("no truck available", retryable=False)


@tool(permissions=["shop"])
def ship_by_post(order: str, idempotency_key: str) -> dict[str, Any]:
    """Ship by post."""
    CALLS.append(("ship_by_post", {"order": order}))
    return {"parcel": f"p-{order}"}


@tool(permissions=["shop"], idempotent=True, cost_usd=5.0)
def courier(order: str) -> dict[str, Any]:
    """An expensive courier."""
    CALLS.append(("courier", {"order": order}))
    return {"courier": order}


@tool(permissions=["shop"], idempotent=True)
def live_tracking(order: str) -> dict[str, Any]:
    """The carrier's live tracking (down)."""
    CALLS.append(("live_tracking", {"order": order}))
    raise ToolError("the carrier's service is down", retryable=False)


@tool(permissions=["shop"], requires_approval=True, rollback="uncharge")
def big_charge(amount: float, idempotency_key: str) -> dict[str, Any]:
    """A charge that a human must approve."""
    CALLS.append(("big_charge", {"amount": amount}))
    return {"charge_id": idempotency_key, "amount": amount}


class Tools:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for fn in (lookup, charge, uncharge, ship_by_truck, ship_by_post, courier, live_tracking, big_charge):
            register(fn)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()


def step(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"description": f"call {tool_name}", "tool_name": tool_name, "tool_args": args}


def wire(*steps: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"reasoning": "test", "steps": list(steps), **top}


REF_TOTAL = {"$ref": "/1/total"}
PRINCIPALS = {"clerk": ["shop"], "boss": ["shop", "approve"], "intern": ["shop"]}


def system_with(scripted: ScriptedPlanner, **config: Any) -> Any:
    config.setdefault("retry", {"base_delay_s": 0.0})
    return make_system(Tools(), scripted, principals=PRINCIPALS, config=config)


def request(message: str = "ship order 7", user: str = "clerk", **kw: Any) -> AgentRequest:
    return AgentRequest(message=message, user_id=user, **kw)


# --- replanning --------------------------------------------------------------------------


def test_a_failed_step_is_replanned_and_the_completed_steps_are_not_run_again() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), step("charge", amount=REF_TOTAL), step("ship_by_truck", order="7")),
        later=[wire(step("ship_by_post", order={"$ref": "/1/order"}))],
    )
    with system_with(planner) as system:
        response = system.run_sync(request())
        shown = system.show(response.run_id)
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert [name for name, _ in CALLS] == ["lookup", "charge", "ship_by_truck", "ship_by_post"]
    assert [(s.step_id, s.tool_name, s.status) for s in response.steps] == [
        (1, "lookup", StepStatus.SUCCEEDED), (2, "charge", StepStatus.SUCCEEDED),
        (3, "ship_by_truck", StepStatus.FAILED), (4, "ship_by_post", StepStatus.SUCCEEDED)]
    assert [(r.number, r.reason) for r in response.revisions] == [(1, "initial"), (2, "replan")]
    # The planner was told what happened, and numbered the new plan after the old one.
    (progress,) = planner.progress
    assert progress.reason == "replan" and progress.next_step_id == 4
    assert "no truck available" in (progress.failure or "")
    assert progress.results == {1: {"order": "7", "total": 12.5, "status": "shipped"},
                                2: {"charge_id": f"{response.run_id}:2", "amount": 12.5}}
    # The journal holds both revisions: show() sees them, and the run's plan is the latest.
    assert [(r.number, r.reason) for r in shown.revisions] == [(1, "initial"), (2, "replan")]
    assert shown.plan is not None and [s.tool_name for s in shown.plan.steps] == ["ship_by_post"]
    assert [s.status for s in shown.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED, StepStatus.FAILED,
                                               StepStatus.SUCCEEDED]
    assert shown.answer == response.answer and "p-7" in response.answer


def test_the_steps_after_a_replanned_failure_are_reported_as_replaced() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), step("ship_by_truck", order="7"), step("charge", amount=REF_TOTAL)),
        later=[wire(step("ship_by_post", order="7"))],
    )
    with system_with(planner) as system:
        response = system.run_sync(request())
        shown = system.show(response.run_id)
    assert response.status is RunStatus.SUCCEEDED
    for steps in (response.steps, shown.steps):
        skipped = [s for s in steps if s.step_id == 3]
        assert skipped[0].status is StepStatus.SKIPPED
        assert skipped[0].error == "not run: replaced by plan revision 2"
    assert "charge" not in [name for name, _ in CALLS]


def test_a_replan_over_the_budget_is_refused_and_the_run_aborts_and_compensates() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), step("charge", amount=REF_TOTAL), step("ship_by_truck", order="7")),
        later=[wire(step("courier", order="7"))],
    )
    with system_with(planner) as system:
        response = system.run_sync(request(budget_usd=1.0))
        shown = system.show(response.run_id)
    assert response.status is RunStatus.FAILED
    assert "replanning found no other approach" in response.message
    assert "estimated tool cost $5.0000 exceeds" in response.message
    assert "courier" not in [name for name, _ in CALLS]
    assert ("uncharge", {"charge_id": f"{response.run_id}:2"}) in CALLS
    assert [r.reason for r in shown.revisions] == ["initial"]  # the refused plan was never journaled
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED, StepStatus.COMPENSATED, StepStatus.FAILED]


def test_replans_are_bounded_by_max_replans() -> None:
    failing = wire(step("ship_by_truck", order="7"))
    planner = ScriptedPlanner(failing, later=[failing, failing, failing])
    with system_with(planner, recovery={"max_replans": 2}) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert len(planner.progress) == 2
    assert [r.reason for r in response.revisions] == ["initial", "replan", "replan"]
    assert [s.step_id for s in response.steps] == [1, 2, 3]
    assert "no replan left ([recovery] max_replans = 2)" in response.message


def test_no_replan_when_max_replans_is_zero() -> None:
    planner = ScriptedPlanner(wire(step("ship_by_truck", order="7")), later=[wire(step("ship_by_post", order="7"))])
    with system_with(planner, recovery={"max_replans": 0}) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED and planner.progress == []
    assert "ship_by_post" not in [name for name, _ in CALLS]


def test_a_later_plan_must_pass_the_same_checks_as_the_first() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), step("ship_by_truck", order="7")),
        # refers to step 2, which failed: it has no result
        later=[wire(step("ship_by_post", order={"$ref": "/2/order"}))],
    )
    with system_with(planner) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert "refers to step(s) [2] of an earlier plan, which have no result" in response.message
    assert "ship_by_post" not in [name for name, _ in CALLS]


def test_a_later_plan_naming_a_tool_the_principal_may_not_call_is_denied_and_audited(isolated_home: Any) -> None:
    planner = ScriptedPlanner(wire(step("ship_by_truck", order="7")), later=[wire(step("ship_by_post", order="7"))])
    system = make_system(Tools(), planner, principals={"clerk": ["other"]},
                         config={"principals": {"clerk": {"permissions": ["shop"], "tools": ["ship_by_truck"]}}})
    with system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert "the new plan was refused (denied)" in response.message
    assert "ship_by_post" not in [name for name, _ in CALLS]
    audit = [json.loads(line) for line in (isolated_home / "audit.jsonl").read_text().splitlines()]
    assert any(r["action"] == "authorize" and r["tool"] == "ship_by_post" and r["decision"] == "deny" for r in audit)


# --- adaptive rounds ------------------------------------------------------------------------


def test_an_adaptive_two_round_plan_sees_the_first_rounds_results() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), observe=True),
        later=[wire(step("charge", amount=REF_TOTAL))],
    )
    with system_with(planner) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert [(r.number, r.reason) for r in response.revisions] == [(1, "initial"), (2, "round")]
    assert planner.progress[0].reason == "round" and planner.progress[0].results[1]["total"] == 12.5
    assert CALLS == [("lookup", {"order": "7"}), ("charge", {"amount": 12.5})]


def test_a_final_answer_ends_the_rounds() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), observe=True),
        later=[{"reasoning": "done", "steps": [], "final": True, "answer": "Order 7 totals 12.5 and has shipped."}],
    )
    with system_with(planner) as system:
        response = system.run_sync(request())
        shown = system.show(response.run_id)
    assert response.status is RunStatus.SUCCEEDED
    assert response.answer == "Order 7 totals 12.5 and has shipped."
    assert response.answer_source == "planner:scripted"
    assert shown.answer == response.answer and shown.plan is not None and shown.plan.answer == response.answer


def test_rounds_are_bounded_by_max_rounds() -> None:
    again = wire(step("lookup", order="7"), observe=True)
    planner = ScriptedPlanner(again, later=[again] * 5)
    with system_with(planner, planner={"max_rounds": 2}) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert len(planner.progress) == 1
    assert "asked for round 3 after round 2, more than the 2 allowed ([planner] max_rounds)" in response.message


def test_a_final_plan_with_steps_is_rejected() -> None:
    with pytest.raises(PlanRejectedError, match='"final": true ends the run with its "answer" and must have no'):
        parse_plan(wire(step("lookup", order="7"), final=True, answer="done"))
    with pytest.raises(PlanRejectedError, match='"observe": true needs steps'):
        parse_plan(wire(observe=True))


def test_a_round_the_planner_cannot_plan_fails_the_run() -> None:
    planner = ScriptedPlanner(wire(step("lookup", order="7"), observe=True), later=[])
    with system_with(planner) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED
    assert "round 2 could not be planned: no planner had one" in response.message


# --- optional steps --------------------------------------------------------------------------


def test_an_unavailable_optional_step_degrades_the_run_and_the_answer_says_so() -> None:
    optional = {**step("live_tracking", order="7"), "optional": True}
    planner = ScriptedPlanner(wire(step("lookup", order="7"), optional, step("charge", amount=REF_TOTAL)))
    with system_with(planner) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.DEGRADED, response.message
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SUCCEEDED]
    assert "What I could not check: call live_tracking (the carrier's service is down)." in response.answer
    assert "optional step 2 (live_tracking) was unavailable" in response.message
    assert planner.progress == []  # an optional step is not replanned


def test_a_required_step_still_aborts() -> None:
    planner = ScriptedPlanner(wire(step("lookup", order="7"), step("live_tracking", order="7")))
    with system_with(planner, recovery={"max_replans": 0}) as system:
        response = system.run_sync(request())
    assert response.status is RunStatus.FAILED


# --- events --------------------------------------------------------------------------------------


async def test_stream_yields_the_events_in_order() -> None:
    planner = ScriptedPlanner(
        wire(step("lookup", order="7"), step("ship_by_truck", order="7")),
        later=[wire(step("ship_by_post", order="7"))],
    )
    async with system_with(planner) as system:
        events = [e async for e in system.stream(request())]
    kinds = [(e.kind, e.data.get("step_id", e.data.get("step").step_id if "step" in e.data else None))
             for e in events]
    assert kinds == [
        ("run_started", None), ("plan_ready", None),
        ("step_started", 1), ("step_finished", 1),
        ("step_started", 2), ("step_attempt_failed", 2), ("step_finished", 2),
        ("replan", None), ("plan_ready", None),
        ("step_started", 3), ("step_finished", 3),
        ("answer", None), ("run_finished", None),
    ]
    assert [e.data["revision"] for e in events if e.kind == "plan_ready"] == [1, 2]
    response = events[-1].data["response"]
    assert response.status is RunStatus.SUCCEEDED and events[-2].data["text"] == response.answer


def test_events_reach_on_event_of_run_sync() -> None:
    seen: list[str] = []
    with system_with(ScriptedPlanner(wire(step("lookup", order="7")))) as system:
        system.run_sync(request(), on_event=lambda e: seen.append(e.kind))
    assert seen == ["run_started", "plan_ready", "step_started", "step_finished", "answer", "run_finished"]


# --- approvals ----------------------------------------------------------------------------------


def approval_system(**config: Any) -> Any:
    planner = ScriptedPlanner(wire(step("lookup", order="7"), step("big_charge", amount=REF_TOTAL)))
    return system_with(planner, **config)


def audit_lines(home: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]


def test_an_approved_step_runs_on_resume(isolated_home: Any) -> None:
    with approval_system() as system:
        waiting = system.run_sync(request())
        assert waiting.status is RunStatus.WAITING, waiting.message
        assert [s.status for s in waiting.steps] == [StepStatus.SUCCEEDED, StepStatus.WAITING]
        assert f"agentkeel approve {waiting.run_id} 2" in waiting.answer
        assert "big_charge" not in [name for name, _ in CALLS]
        (pending,) = system.approvals()
        assert (pending.run_id, pending.step_id, pending.tool_name, dict(pending.args), pending.requested_by) == (
            waiting.run_id, 2, "big_charge", {"amount": 12.5}, "clerk")
        # A second resume before any decision waits again, asking nothing new.
        again = system.resume_sync(waiting.run_id)
        assert again.status is RunStatus.WAITING and len(system.approvals(None)) == 1
        decided = system.decide(waiting.run_id, 2, approver="boss", approved=True, reason="fine")
        assert decided.status == "approved" and decided.decided_by == "boss"
        assert system.approvals() == []
        done = system.resume_sync(waiting.run_id)
    assert done.status is RunStatus.SUCCEEDED, done.message
    assert [name for name, _ in CALLS] == ["lookup", "big_charge"]
    audit = audit_lines(isolated_home)
    assert any(r["action"] == "approval" and r["decision"] == "wait" and r["tool"] == "big_charge" for r in audit)
    assert any(r["action"] == "approve" and r["principal"] == "boss" and r["decision"] == "allow" for r in audit)


def test_a_denied_step_aborts_the_run_on_resume() -> None:
    planner = ScriptedPlanner(wire(step("charge", amount=3.0), step("big_charge", amount=20.0)))
    with system_with(planner) as system:
        waiting = system.run_sync(request())
        system.decide(waiting.run_id, 2, approver="boss", approved=False, reason="too much")
        done = system.resume_sync(waiting.run_id)
    assert done.status is RunStatus.DENIED
    assert "big_charge was denied by boss: too much" in done.message
    assert [name for name, _ in CALLS] == ["charge", "uncharge"]  # the first charge was compensated
    assert "big_charge" not in [name for name, _ in CALLS]


def test_only_a_principal_holding_approve_who_is_not_the_requester_may_decide(isolated_home: Any) -> None:
    with approval_system() as system:
        waiting = system.run_sync(request())
        with pytest.raises(ApprovalError, match="does not hold the 'approve' permission"):
            system.decide(waiting.run_id, 2, approver="intern", approved=True)
        with pytest.raises(ApprovalError, match="is not a principal"):
            system.decide(waiting.run_id, 2, approver="mallory", approved=True)
        with pytest.raises(ApprovalError, match="has no approval request"):
            system.decide(waiting.run_id, 1, approver="boss", approved=True)
        assert system.approvals()[0].status == "pending"
    with approval_system() as system:
        mine = system.run_sync(request(user="boss"))
        with pytest.raises(ApprovalError, match="asked for this call and may not approve it themselves"):
            system.decide(mine.run_id, 2, approver="boss", approved=True)
    with approval_system(approvals={"allow_self": True}) as system:
        mine = system.run_sync(request(user="boss"))
        system.decide(mine.run_id, 2, approver="boss", approved=True)
        assert system.resume_sync(mine.run_id).status is RunStatus.SUCCEEDED
    refusals = [r for r in audit_lines(isolated_home) if r["action"] == "approve" and r["decision"] == "deny"]
    assert {r["principal"] for r in refusals} == {"intern", "mallory", "boss"}


def test_an_unanswered_approval_expires_as_a_denial() -> None:
    with approval_system(approvals={"ttl_s": 0.2}) as system:
        waiting = system.run_sync(request())
        time.sleep(0.3)
        assert system.approvals() == [] and system.approvals("expired")[0].step_id == 2
        with pytest.raises(ApprovalError, match="expired"):
            system.decide(waiting.run_id, 2, approver="boss", approved=True)
        done = system.resume_sync(waiting.run_id)
    assert done.status is RunStatus.DENIED
    assert "expired" in done.message and "counts as a denial" in done.message
    assert "big_charge" not in [name for name, _ in CALLS]


def test_a_principal_rule_asks_approval_only_above_a_threshold() -> None:
    principals = {"clerk": {"permissions": ["shop"], "approval": {"charge": {"amount": {"exclusiveMinimum": 100}}}},
                  "boss": {"permissions": ["shop", "approve"]}}
    small = ScriptedPlanner(wire(step("charge", amount=50.0)))
    with make_system(Tools(), small, config={"principals": principals}) as system:
        assert system.run_sync(request()).status is RunStatus.SUCCEEDED
    large = ScriptedPlanner(wire(step("charge", amount=150.0)))
    with make_system(Tools(), large, config={"principals": principals}) as system:
        waiting = system.run_sync(request())
        assert waiting.status is RunStatus.WAITING
        system.decide(waiting.run_id, 1, approver="boss", approved=True)
        assert system.resume_sync(waiting.run_id).status is RunStatus.SUCCEEDED
    assert [args for name, args in CALLS if name == "charge"] == [{"amount": 50.0}, {"amount": 150.0}]


def test_two_deciders_at_once_one_wins() -> None:
    with approval_system() as system:
        waiting = system.run_sync(request())

        async def both() -> list[Any]:
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                loop.run_in_executor(None, lambda: system.decide(waiting.run_id, 2, approver="boss", approved=True)),
                loop.run_in_executor(None, lambda: system.decide(waiting.run_id, 2, approver="boss", approved=False)),
                return_exceptions=True)

        outcomes = asyncio.run(both())
    assert sum(isinstance(o, ApprovalError) for o in outcomes) == 1


# --- memory: a follow-up sees the answer and the facts -------------------------------------------


def test_a_follow_up_in_the_same_session_sees_the_first_answer_and_its_facts(openai_server_env: Any) -> None:
    server = openai_server_env
    config = {"models": {"tiers": [{"name": "fast", "model": "gpt-4o-mini", "max_tokens": 256}]},
              "retry": {"base_delay_s": 0.0}}
    server.queue(wire(step("lookup", order="7")), usage=(100, 20))  # turn 1: the plan
    server.queue("Order 7 has shipped; it totals 12.50.", usage=(100, 12))  # turn 1: the answer
    server.queue(wire(step("charge", amount=12.5)), usage=(100, 20))  # turn 2: the plan
    server.queue("I charged 12.50 for order 7.", usage=(100, 10))  # turn 2: the answer
    with make_system(Tools(), principals=PRINCIPALS, config=config) as system:
        first = system.run_sync(request("where is order 7?", session_id="s1"))
        second = system.run_sync(request("charge its total", session_id="s1"))
        elsewhere = system.run_sync(request("charge its total", session_id="s2"))
    assert first.answer == "Order 7 has shipped; it totals 12.50." and first.answer_source == "llm:fast"
    assert second.status is RunStatus.SUCCEEDED and second.answer == "I charged 12.50 for order 7."
    assert [c.tier for c in first.costs] == ["fast", "fast"]  # the plan and the answer, both priced
    planner_prompt = json.dumps(server.requests[2]["messages"])
    assert "Order 7 has shipped; it totals 12.50." in planner_prompt
    assert "lookup(order=7): order 7, total 12.50, status shipped" in planner_prompt
    # another session of the same user has none of these turns; it may retrieve them as a memory
    # of the user's (the scripted server has no more replies)
    assert elsewhere.status is RunStatus.FAILED
    other = server.requests[4]["messages"][0]["content"]
    assert '"role":"assistant","content":"Order 7 has shipped' not in other
    assert '{"memory":"user: where is order 7?\\nassistant: Order 7 has shipped' in other


# --- hostile values in answers -----------------------------------------------------------------


def test_answer_templates_render_values_as_data() -> None:
    from agentkeel.responder.default import render_answer

    results = {1: {"total": 12.5, "note": "line one\nline two\t{2.secret}", "nested": {"a": [1, 2]}}}
    assert render_answer("{1.total:.2f} {1.note}", results) == "12.50 line one line two {2.secret}"
    assert render_answer("{1.nested.a.1} {1.nested}", results) == '2 {"a": [1, 2]}'
    # a spec that would allocate a gigabyte is not applied: the value renders plainly
    assert render_answer("{1.total:>999999999}", results) == "12.50"
    assert render_answer("{1.missing}", results) is None
    assert render_answer([{"when": {"ref": "/1/total", "op": "gt", "value": 100}, "text": "big"},
                          {"text": "small {1.total}"}], results) == "small 12.50"


def test_the_cli_escapes_control_characters_in_answers() -> None:
    from agentkeel.cli.common import one_line, printable

    assert printable("ok\x1b[2Jgone\nnext\tcol\x07") == "ok\\x1b[2Jgone\nnext\tcol\\x07"
    assert one_line("a\x1b]0;title\x07\nb") == "a\\x1b]0;title\\x07 b"
