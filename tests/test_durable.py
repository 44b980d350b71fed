"""Durable runs in one process: journal contents, abort with compensation, resume
of in-doubt and waiting runs, rollback on request. The crash harness, with real
SIGKILLs, is in tests/durable/."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import AgentRequest, Decision, RunStatus, StepStatus, hookimpl, tool
from agentkeel.errors import LeaseHeldError, RunNotFoundError
from agentkeel.journal.base import StepRecord
from agentkeel.testing import ScriptedPlanner, make_system


class Ledger:
    """Tools with effects the test can count: a key-taking charge with a refund
    compensator, a never-twice notification, and a tool that always fails."""

    def __init__(self) -> None:
        self.charges: dict[str, float] = {}
        self.refunded: list[str] = []
        self.notified: list[str] = []
        self.calls: list[str] = []

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        ledger = self

        @tool(permissions=["ledger"], idempotent=False, rollback="refund")
        async def charge(amount: float, idempotency_key: str | None = None) -> dict:
            ledger.calls.append("charge")
            assert idempotency_key is not None
            ledger.charges.setdefault(idempotency_key, amount)  # the backend honours the key
            return {"charge_id": idempotency_key, "amount": amount}

        @tool(permissions=["ledger"], idempotent=True)
        async def refund(charge_id: str, amount: float) -> dict:
            ledger.calls.append("refund")
            if charge_id not in ledger.refunded:
                ledger.refunded.append(charge_id)
            return {"refunded": charge_id}

        @tool(permissions=["ledger"], idempotent=False)
        async def notify(text: str) -> dict:
            ledger.calls.append("notify")
            ledger.notified.append(text)
            return {"sent": text}

        @tool(permissions=["ledger"], idempotent=False)
        async def explode() -> dict:
            ledger.calls.append("explode")
            raise RuntimeError("boom")

        @tool(permissions=["ledger"], idempotent=True, cost_usd=0.2)
        async def fee(text: str) -> dict:
            ledger.calls.append("fee")
            return {"paid": text}

        for fn in (charge, refund, notify, explode, fee):
            register(fn)


def step(tool_name: str, args: dict) -> dict:
    return {"description": tool_name, "tool_name": tool_name, "tool_args": args}


def plan(*steps: dict) -> dict:
    return {"reasoning": "test", "steps": list(steps)}


USER = {"u": ["ledger"]}


def crashed_run(system: Any, wire: dict, *records: StepRecord, **run: Any) -> None:
    """Journal what a process that crashed mid-run leaves behind: run "crashed",
    ``records`` written, and a lease that has already expired (it was taken an hour
    ago for a minute: no waiting for time to pass)."""
    from agentkeel.planner.plan import parse_plan

    run.setdefault("budget_usd", None)
    lease = system.journal.create_run(run_id="crashed", user_id="u", session_id="s", message="m",
                                      principal="u", plan=parse_plan(wire).to_dict(),
                                      owner="elsewhere:1:1", ttl_s=-3600.0, **run)
    for record in records:
        (system.journal.intent if record.phase == "intent" else system.journal.outcome)(lease, record)


async def test_every_step_is_journaled_and_listed() -> None:
    ledger = Ledger()
    system = make_system(ledger, ScriptedPlanner(plan(step("charge", {"amount": 5}), step("notify", {"text": "hi"}))),
                         principals=USER)
    async with system:
        response = await system.run(AgentRequest(message="pay", user_id="u"))
        state = system.journal.load(response.run_id)
        assert state.run.status == "succeeded"
        kinds = [(r.step_id, r.phase) for r in state.steps]
        assert kinds == [(1, "intent"), (1, "outcome"), (2, "intent"), (2, "outcome")]
        intent, outcome = state.forward(1)
        assert intent is not None and intent.idempotency_key == f"{response.run_id}:1"
        assert outcome is not None and outcome.result == {"charge_id": f"{response.run_id}:1", "amount": 5}
        assert system.runs()[0].run_id == response.run_id  # newest first
        shown = system.show(response.run_id)
        assert [s.status for s in shown.steps] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED]
        with pytest.raises(RunNotFoundError):
            system.show("no-such-run")


async def test_late_failure_compensates_completed_steps_in_reverse() -> None:
    ledger = Ledger()
    wire = plan(step("charge", {"amount": 5}), step("charge", {"amount": 7}), step("explode", {}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        response = await system.run(AgentRequest(message="pay", user_id="u"))
        state = system.journal.load(response.run_id)
    assert response.status is RunStatus.FAILED
    assert [s.status for s in response.steps] == [StepStatus.COMPENSATED, StepStatus.COMPENSATED, StepStatus.FAILED]
    run_id = response.run_id
    assert ledger.refunded == [f"{run_id}:2", f"{run_id}:1"]  # last first
    assert "rolled back step(s) 2, 1" in response.message
    compensations = [r for r in state.steps if r.kind == "compensation"]
    assert [(r.step_id, r.phase, r.status) for r in compensations] == [
        (2, "intent", None), (2, "outcome", "succeeded"), (1, "intent", None), (1, "outcome", "succeeded"),
    ]


async def test_non_idempotent_step_started_but_unfinished_is_in_doubt() -> None:
    ledger = Ledger()
    wire = plan(step("charge", {"amount": 5}), step("notify", {"text": "hi"}), step("notify", {"text": "bye"}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        # A crash in the middle of step 2: step 1 done, step 2 started.
        crashed_run(
            system, wire,
            StepRecord(1, "forward", "intent", "charge", {"amount": 5}, "crashed:1"),
            StepRecord(1, "forward", "outcome", "charge", {"amount": 5}, "crashed:1", "succeeded",
                       {"charge_id": "crashed:1", "amount": 5}),
            StepRecord(2, "forward", "intent", "notify", {"text": "hi"}, "crashed:2"),
        )
        response = await system.resume("crashed")
    assert response.status is RunStatus.IN_DOUBT
    assert "step 2 (notify)" in response.message and "A human must check" in response.message
    assert ledger.calls == []  # step 1 not re-run, step 2 not re-run, step 3 not started
    assert [s.status for s in response.steps] == [StepStatus.SUCCEEDED, StepStatus.IN_DOUBT, StepStatus.SKIPPED]


async def test_key_taking_step_started_but_unfinished_is_rerun_with_the_same_key() -> None:
    ledger = Ledger()
    wire = plan(step("charge", {"amount": 5}), step("notify", {"text": "hi"}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        crashed_run(system, wire, StepRecord(1, "forward", "intent", "charge", {"amount": 5}, "crashed:1"))
        ledger.charges["crashed:1"] = 5  # the charge went through before the crash
        response = await system.resume("crashed")
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert ledger.charges == {"crashed:1": 5}  # same key: still one charge
    assert ledger.calls == ["charge", "notify"]


async def test_live_holder_refuses_a_second_resumer() -> None:
    ledger = Ledger()
    wire = plan(step("notify", {"text": "hi"}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        from agentkeel.journal.base import make_owner
        from agentkeel.planner.plan import parse_plan

        system.journal.create_run(run_id="busy", user_id="u", session_id="s", message="m", principal="u",
                                  budget_usd=None, plan=parse_plan(wire).to_dict(), owner=make_owner() + ":other",
                                  ttl_s=60)
        with pytest.raises(LeaseHeldError):
            await system.resume("busy")
    assert ledger.calls == []


async def test_waiting_for_approval_pauses_and_resume_continues() -> None:
    class Approvals:
        approved = False

        @hookimpl
        def agentkeel_authorize(self, tool: Any, args: Any) -> Decision | None:
            if tool.name == "charge" and args is not None and not self.approved:
                return Decision(False, "a manager must approve charges", wait=True)
            return None

    ledger = Ledger()
    approvals = Approvals()
    wire = plan(step("notify", {"text": "before"}), step("charge", {"amount": 5}), step("notify", {"text": "after"}))
    system = make_system(ledger, approvals, ScriptedPlanner(wire), principals=USER)
    async with system:
        paused = await system.run(AgentRequest(message="pay", user_id="u"))
        assert paused.status is RunStatus.WAITING
        assert "a manager must approve charges" in paused.message
        assert [s.status for s in paused.steps] == [StepStatus.SUCCEEDED, StepStatus.WAITING, StepStatus.PENDING]
        approvals.approved = True
        resumed = await system.resume(paused.run_id)
    assert resumed.status is RunStatus.SUCCEEDED, resumed.message
    assert ledger.notified == ["before", "after"]  # step 1 was not sent twice
    assert len(ledger.charges) == 1


async def test_rollback_on_request_of_a_finished_run() -> None:
    ledger = Ledger()
    system = make_system(ledger, ScriptedPlanner(plan(step("charge", {"amount": 5}), step("notify", {"text": "x"}))),
                         principals=USER)
    async with system:
        done = await system.run(AgentRequest(message="pay", user_id="u"))
        rolled = await system.rollback(done.run_id)
        again = await system.rollback(done.run_id)
    assert rolled.status is RunStatus.ROLLED_BACK
    assert [s.status for s in rolled.steps] == [StepStatus.COMPENSATED, StepStatus.SUCCEEDED]
    assert ledger.refunded == [f"{done.run_id}:1"]
    assert again.status is RunStatus.ROLLED_BACK
    assert ledger.calls.count("refund") == 1  # already compensated: not run again


@pytest.mark.parametrize(("happened", "sent"), [(True, []), (False, ["hi"])])
async def test_operator_resolves_an_in_doubt_step(happened: bool, sent: list[str]) -> None:
    from agentkeel.errors import AgentkeelError

    ledger = Ledger()
    wire = plan(step("notify", {"text": "hi"}), step("notify", {"text": "bye"}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        crashed_run(system, wire, StepRecord(1, "forward", "intent", "notify", {"text": "hi"}, "crashed:1"))
        doubt = await system.resume("crashed")
        assert doubt.status is RunStatus.IN_DOUBT
        assert "--resolve 1=done" in doubt.message
        with pytest.raises(AgentkeelError, match=r"step 2 .* is not in doubt"):
            await system.resume("crashed", {2: True})
        response = await system.resume("crashed", {1: happened})
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert ledger.notified == [*sent, "bye"]


async def test_an_aborted_run_is_journaled_rolling_back_with_the_status_it_will_end_in() -> None:
    class Refuses:
        """Denies notify at call time; records the run as journaled while compensating."""

        def __init__(self) -> None:
            self.journal: Any = None
            self.seen: list[tuple[str, str]] = []

        @hookimpl
        def agentkeel_authorize(self, tool: Any, args: Any) -> Decision | None:
            if tool.name == "notify" and args is not None:
                return Decision(False, "notifications are switched off")
            return None

        @hookimpl
        def agentkeel_event(self, event: Any) -> None:
            if event.kind == "step_compensated":
                run = self.journal.load(event.run_id).run
                self.seen.append((run.status, run.then_status))

    ledger, refuses = Ledger(), Refuses()
    wire = plan(step("charge", {"amount": 5}), step("notify", {"text": "hi"}))
    system = make_system(ledger, refuses, ScriptedPlanner(wire), principals=USER)
    refuses.journal = system.journal
    async with system:
        response = await system.run(AgentRequest(message="pay", user_id="u"))
        run = system.journal.load(response.run_id).run
    assert response.status is RunStatus.DENIED, response.message
    assert [s.status for s in response.steps] == [StepStatus.COMPENSATED, StepStatus.DENIED]
    assert ledger.refunded == [f"{response.run_id}:1"] and ledger.notified == []
    assert refuses.seen == [("rolling_back", "denied")]  # while compensating: what it will end as
    assert (run.status, run.then_status) == ("denied", "")


@pytest.mark.parametrize(("planning_usd", "status"), [(0.5, RunStatus.SUCCEEDED), (0.9, RunStatus.BUDGET_EXHAUSTED)])
async def test_resume_counts_what_planning_already_cost(planning_usd: float, status: RunStatus) -> None:
    ledger = Ledger()
    wire = plan(step("fee", {"text": "a"}), step("fee", {"text": "b"}))
    system = make_system(ledger, ScriptedPlanner(wire), principals=USER)
    async with system:
        # Crashed after planning (which cost planning_usd) and step 1 ($0.20), before step 2.
        crashed_run(
            system, wire,
            StepRecord(1, "forward", "intent", "fee", {"text": "a"}, "crashed:1"),
            StepRecord(1, "forward", "outcome", "fee", {"text": "a"}, "crashed:1", "succeeded", {"paid": "a"},
                       cost_usd=0.2),
            budget_usd=1.0, planning_cost_usd=planning_usd,
        )
        response = await system.resume("crashed")
        shown = system.show("crashed")
    assert response.status is status, response.message
    assert ledger.calls == (["fee"] if status is RunStatus.SUCCEEDED else [])
    spent_steps = 0.2 + (0.2 if status is RunStatus.SUCCEEDED else 0.0)
    assert shown.total_cost_usd == pytest.approx(planning_usd + spent_steps)
