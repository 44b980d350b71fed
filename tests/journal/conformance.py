"""The conformance suite of the ``agentkeel.journal.Journal`` protocol, for every backend.

Use it by subclassing ``JournalConformance`` in a ``test_*.py`` module, as a
``Test...`` class, and defining two fixtures:

- ``make_journal``: a callable ``(clock=time.time) -> Journal`` that opens a
  journal on this test's (empty) state; calling it twice must give two handles
  on the same state when the backend is shared between handles and processes.
- ``child_factory``: a picklable zero-argument callable that opens the same
  journal in another process (with the real clock), or ``None`` for a backend
  that cannot be shared (the multi-process tests are then skipped).

Every journal the factory opens is closed by the backend's fixture. The tests
that need several handles or processes live in ``conformance_processes``; the
fake clock, record builders and process helpers in ``helpers``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

import attrs
import pytest
from agentkeel.errors import (
    ApprovalError,
    FencedError,
    JournalRecordError,
    LeaseHeldError,
    RunExistsError,
    RunNotFoundError,
)
from agentkeel.journal.base import ApprovalRecord, Journal, Lease, PlanRecord, StepRecord, make_owner
from agentkeel.types import RunStatus, StepStatus

from tests.journal.conformance_processes import ProcessConformance
from tests.journal.helpers import (
    ALICE,
    BOB,
    HAS_PROC,
    FakeClock,
    MakeJournal,
    a_plan,
    another_plan,
    ask,
    fields_of,
    intent,
    new_run,
    outcome,
    proc_state,
    spawn_owner_process,
)


class JournalConformance(ProcessConformance):
    """The tests every ``Journal`` backend must pass (see the module docstring)."""

    # --- runs ----------------------------------------------------------------------

    def test_create_and_load_round_trip(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, ttl_s=12.5)
        assert lease == Lease("run-1", ALICE, 1, clock.now + 12.5)
        new_run(journal, "run-2", budget_usd=None, plan={"steps": [], "nested": {"a": [1, 2.5]}})

        run = journal.load("run-1").run
        assert (run.run_id, run.user_id, run.session_id, run.principal) == (
            "run-1",
            "u-1",
            "s-1",
            "support",
        )
        assert run.message == "refund order A-17 🙏"
        assert run.budget_usd == 0.25
        assert run.plan == a_plan()
        assert (run.status, run.detail, run.owner, run.epoch) == ("running", "", ALICE, 1)
        assert run.created_at == run.updated_at == clock.now
        assert run.lease_expires_at == lease.expires_at
        assert (run.planning_cost_usd, run.then_status) == (0.0, "")  # the defaults
        assert journal.load("run-1").steps == ()
        other = journal.load("run-2").run
        assert other.budget_usd is None
        assert other.plan == {"steps": [], "nested": {"a": [1, 2.5]}}

    def test_create_refuses_a_taken_run_id(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        new_run(journal)
        with pytest.raises(RunExistsError, match="run-1"):
            new_run(journal, owner=BOB)
        assert journal.load("run-1").run.owner == ALICE

    def test_plan_that_is_not_json_is_refused(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        with pytest.raises(JournalRecordError, match="plan"):
            new_run(journal, plan={"when": {1, 2}})
        with pytest.raises(RunNotFoundError):
            journal.load("run-1")

    def test_unknown_run(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        with pytest.raises(RunNotFoundError, match="nope"):
            journal.load("nope")
        with pytest.raises(RunNotFoundError):
            journal.acquire("nope", ALICE)
        ghost = Lease("nope", ALICE, 1, time.time() + 60)
        with pytest.raises(RunNotFoundError):
            journal.intent(ghost, intent(1))
        with pytest.raises(RunNotFoundError):
            journal.set_status(ghost, "failed")
        assert journal.list_runs() == []

    def test_list_runs_of_one_user(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        new_run(journal, "a1", user_id="ann")
        new_run(journal, "b1", user_id="bob")
        new_run(journal, "a2", user_id="ann")
        assert {r.run_id for r in journal.list_runs(user_id="ann")} == {"a1", "a2"}
        assert [r.run_id for r in journal.list_runs(1, user_id="ann")] == [journal.list_runs(user_id="ann")[0].run_id]
        assert journal.list_runs(user_id="nobody") == []

    def test_abandoned_runs_are_the_unheld_unfinished_ones(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        held = new_run(journal, "held", ttl_s=30)
        released = new_run(journal, "released", ttl_s=30)
        journal.release(released)  # paused by a process on its way out
        new_run(journal, "expiring", ttl_s=5)
        done = new_run(journal, "done", ttl_s=1)
        journal.set_status(done, "succeeded")
        waiting = new_run(journal, "waiting", ttl_s=1)
        journal.set_status(waiting, "waiting")
        rolling = new_run(journal, "rolling", ttl_s=1)
        journal.set_status(rolling, "rolling_back", then_status="failed")
        now = clock()
        assert [r.run_id for r in journal.abandoned_runs(now)] == ["released"]
        clock.advance(10)  # "expiring" and "rolling" ran out; "held" has 20 s left
        assert [r.run_id for r in journal.abandoned_runs(clock())] == ["released", "expiring", "rolling"]
        assert len(journal.abandoned_runs(clock(), limit=1)) == 1
        journal.acquire("expiring", ALICE, 30)  # taken over: held again
        assert [r.run_id for r in journal.abandoned_runs(clock())] == ["released", "rolling"]
        assert held.run_id not in {r.run_id for r in journal.abandoned_runs(clock())}

    def test_list_runs_newest_first(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        new_run(journal, "old")
        clock.advance(5)
        new_run(journal, "tie-first")
        new_run(journal, "tie-second")  # same created_at: the later insert comes first
        clock.advance(-100)
        new_run(journal, "clock-went-back")
        assert [r.run_id for r in journal.list_runs()] == [
            "tie-second",
            "tie-first",
            "old",
            "clock-went-back",
        ]
        assert [r.run_id for r in journal.list_runs(limit=2)] == ["tie-second", "tie-first"]
        assert journal.list_runs(limit=0) == []
        assert journal.list_runs()[0].plan == a_plan()

    def test_set_status(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        clock.advance(3)
        journal.set_status(lease, "in_doubt", "step 2 (shop:refund) started and did not finish ✗")
        run = journal.load("run-1").run
        assert (run.status, run.detail) == (
            "in_doubt",
            "step 2 (shop:refund) started and did not finish ✗",
        )
        assert run.updated_at == clock.now and run.created_at == clock.now - 3
        journal.set_status(lease, StepStatus.FAILED)
        assert journal.load("run-1").run.status == "failed"
        assert journal.load("run-1").run.detail == ""

    def test_planning_cost_round_trips(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        new_run(journal, planning_cost_usd=0.012345678901)
        new_run(journal, "run-2", planning_cost_usd=2)  # an int is stored as a float
        run = journal.load("run-1").run
        assert run.planning_cost_usd == 0.012345678901 and type(run.planning_cost_usd) is float
        other = journal.load("run-2").run
        assert other.planning_cost_usd == 2.0 and type(other.planning_cost_usd) is float
        listed = {r.run_id: r.planning_cost_usd for r in journal.list_runs()}
        assert listed == {"run-1": 0.012345678901, "run-2": 2.0}

    def test_then_status_is_set_with_the_status_and_cleared_by_the_next(
        self, make_journal: MakeJournal
    ) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, planning_cost_usd=0.5)
        clock.advance(2)
        journal.set_status(lease, "rolling_back", "step 3 failed", then_status="failed")
        run = journal.load("run-1").run
        assert (run.status, run.detail, run.then_status) == ("rolling_back", "step 3 failed", "failed")
        assert run.updated_at == clock.now
        assert run.planning_cost_usd == 0.5  # a status change leaves the planning cost alone
        assert [r.then_status for r in journal.list_runs()] == ["failed"]
        journal.set_status(lease, RunStatus.ROLLING_BACK, "asked to", then_status=RunStatus.ROLLED_BACK)
        run = journal.load("run-1").run
        assert (run.status, run.then_status) == ("rolling_back", "rolled_back")
        assert type(run.then_status) is str  # enum members are stored as their value
        journal.set_status(lease, "failed", "done")
        assert journal.load("run-1").run.then_status == ""

    def test_a_fenced_set_status_leaves_then_status_alone(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        stale = new_run(journal, ttl_s=10)
        journal.set_status(stale, "rolling_back", "aborting", then_status="denied")
        clock.advance(11)
        fresh = journal.acquire("run-1", BOB)
        with pytest.raises(FencedError):
            journal.set_status(stale, "rolling_back", "stale", then_status="rolled_back")
        run = journal.load("run-1").run
        assert (run.status, run.detail, run.then_status) == ("rolling_back", "aborting", "denied")
        journal.set_status(fresh, "rolling_back", "resumed", then_status="denied")
        assert journal.load("run-1").run.then_status == "denied"

    # --- plan revisions -----------------------------------------------------------------

    def test_create_run_records_the_plan_as_revision_1(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        new_run(journal, planning_cost_usd=0.125)
        clock.advance(7)
        new_run(journal, "run-2", plan={"steps": [], "ids": (1, 2)})
        with pytest.raises(RunExistsError):
            new_run(journal, plan=another_plan())  # a refused create writes no revision either
        assert journal.load("run-1").revisions == (PlanRecord(1, "initial", a_plan(), 0.125, clock.now - 7),)
        assert journal.load("run-2").revisions == (
            PlanRecord(1, "initial", {"steps": [], "ids": [1, 2]}, 0.0, clock.now),
        )

    def test_revise_plan_appends_a_revision_and_makes_it_the_plan(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, planning_cost_usd=0.5)
        created = clock.now
        journal.intent(lease, intent(1))
        journal.set_status(lease, "running", "replanning after step 1", then_status="replan")
        clock.advance(4)
        revision = journal.revise_plan(lease, another_plan(), "replan", planning_cost_usd=0.25)
        assert revision == 2 and type(revision) is int
        state = journal.load("run-1")
        assert state.run.plan == another_plan()
        assert state.run.planning_cost_usd == 0.75  # added to what planning had cost
        assert state.run.then_status == ""  # the replan is journaled: nothing left to plan on resume
        assert (state.run.status, state.run.detail) == ("running", "replanning after step 1")
        assert state.run.updated_at == clock.now
        assert state.revisions == (
            PlanRecord(1, "initial", a_plan(), 0.5, created),
            PlanRecord(2, "replan", another_plan(), 0.25, clock.now),
        )
        assert len(state.steps) == 1  # steps are left alone

        clock.advance(1)
        assert journal.revise_plan(lease, {"steps": [], "round": (2,)}, "round") == 3
        state = journal.load("run-1")
        assert state.run.plan == {"steps": [], "round": [2]}
        assert state.run.planning_cost_usd == 0.75  # the default cost is 0
        assert [(r.revision, r.reason, r.planning_cost_usd, r.ts) for r in state.revisions] == [
            (1, "initial", 0.5, created),
            (2, "replan", 0.25, clock.now - 1),
            (3, "round", 0.0, clock.now),
        ]
        assert state.revisions[-1].plan == state.run.plan
        (listed,) = journal.list_runs()
        assert (listed.plan, listed.planning_cost_usd) == ({"steps": [], "round": [2]}, 0.75)
        acquired = journal.acquire("run-1", ALICE)  # numbering continues under a new lease
        assert journal.revise_plan(acquired, a_plan(), "replan", 1) == 4
        assert journal.load("run-1").run.planning_cost_usd == 1.75

    def test_a_fenced_revise_plan_writes_nothing(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        stale = new_run(journal, ttl_s=10)
        journal.set_status(stale, "running", "", then_status="replan")
        clock.advance(11)
        fresh = journal.acquire("run-1", BOB)
        before = journal.load("run-1")
        clock.advance(1)
        with pytest.raises(FencedError, match=BOB) as info:
            journal.revise_plan(stale, another_plan(), "replan", planning_cost_usd=0.3)
        assert (info.value.epoch, info.value.current_epoch, info.value.holder) == (1, 2, BOB)
        assert journal.load("run-1") == before
        with pytest.raises(RunNotFoundError):
            journal.revise_plan(Lease("nope", ALICE, 1, clock.now + 60), another_plan(), "replan")
        journal.release(fresh)
        with pytest.raises(FencedError, match="released"):
            journal.revise_plan(fresh, another_plan(), "replan")
        assert journal.load("run-1").revisions == before.revisions
        taken = journal.acquire("run-1", BOB)
        assert journal.revise_plan(taken, another_plan(), "replan") == 2

    def test_revise_plan_refuses_bad_arguments_and_writes_nothing(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, planning_cost_usd=0.5)
        journal.set_status(lease, "running", "", then_status="replan")
        before = journal.load("run-1")
        clock.advance(3)
        for reason in ("initial", "replanned", "", "ROUND"):
            with pytest.raises(JournalRecordError, match="reason") as info:
                journal.revise_plan(lease, another_plan(), reason)
            assert "replan" in str(info.value) and "round" in str(info.value)  # names the allowed ones
        with pytest.raises(JournalRecordError, match="plan"):
            journal.revise_plan(lease, {"when": {1, 2}}, "replan")
        for cost in (-0.01, math.nan, math.inf, -math.inf):
            with pytest.raises(JournalRecordError, match="planning_cost_usd"):
                journal.revise_plan(lease, another_plan(), "replan", planning_cost_usd=cost)
        assert journal.load("run-1") == before
        assert journal.revise_plan(lease, another_plan(), "replan") == 2  # numbering did not skip

    # --- the answer --------------------------------------------------------------------

    def test_answer_is_set_with_the_status_and_kept_when_none(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, ttl_s=10)
        assert journal.load("run-1").run.answer == ""
        journal.set_status(lease, "succeeded", "done", answer="Refund R-1 issued ✓ 退款")
        run = journal.load("run-1").run
        assert (run.status, run.detail, run.answer) == ("succeeded", "done", "Refund R-1 issued ✓ 退款")
        assert [r.answer for r in journal.list_runs()] == ["Refund R-1 issued ✓ 退款"]
        clock.advance(2)
        journal.set_status(lease, "rolling_back", "asked to", then_status="rolled_back")  # answer=None
        run = journal.load("run-1").run
        assert (run.status, run.answer, run.updated_at) == ("rolling_back", "Refund R-1 issued ✓ 退款", clock.now)
        journal.set_status(lease, "rolled_back", answer="The refund was cancelled.")
        assert journal.load("run-1").run.answer == "The refund was cancelled."
        journal.set_status(lease, "rolled_back", answer="")  # an empty answer replaces too
        assert journal.load("run-1").run.answer == ""
        journal.set_status(lease, "failed", answer="kept")
        clock.advance(11)
        fresh = journal.acquire("run-1", BOB)
        with pytest.raises(FencedError):
            journal.set_status(lease, "succeeded", answer="stale")
        assert journal.load("run-1").run.answer == "kept"
        journal.set_status(fresh, "failed", "resumed")
        assert journal.load("run-1").run.answer == "kept"

    # --- approvals ----------------------------------------------------------------------

    def test_request_approval_records_a_pending_request(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        args = {"order_id": "A-17", "lines": (1, 2), "note": "Rückerstattung ✓"}
        record = ask(journal, lease, 2, ttl_s=90, args=args)
        assert record == ApprovalRecord(
            run_id="run-1",
            step_id=2,
            tool_name="shop:refund",
            args={"order_id": "A-17", "lines": [1, 2], "note": "Rückerstattung ✓"},
            requested_by="policy:refunds-over-100",
            requested_at=clock.now,
            expires_at=clock.now + 90,
        )
        assert (record.status, record.decided_by, record.decided_at, record.reason) == ("pending", "", 0.0, "")
        args["order_id"] = "changed"  # the journal keeps what was asked
        assert journal.approval("run-1", 2) == record
        assert journal.approval("run-1", 3) is None
        assert journal.approval("nope", 2) is None
        assert journal.list_approvals() == [record]

    def test_request_approval_is_idempotent_per_step(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        first = ask(journal, lease, 2, ttl_s=60)
        clock.advance(5)
        again = ask(journal, lease, 2, ttl_s=999, tool_name="shop:other", args={"x": 1}, requested_by="someone")
        assert again == first  # returned unchanged: same expiry, same args
        other = ask(journal, lease, 3)  # another step is another approval
        assert (other.step_id, other.requested_at) == (3, clock.now)
        journal.decide_approval("run-1", 2, approved=False, by="carol")
        denied = journal.approval("run-1", 2)
        assert denied is not None and denied.status == "denied"
        assert ask(journal, lease, 2) == denied  # a decided one is returned as decided, not re-opened
        acquired = journal.acquire("run-1", ALICE)  # a resume asks again: same record
        assert ask(journal, acquired, 3) == other
        assert len(journal.list_approvals(None)) == 2

    def test_approve_and_deny(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        ask(journal, lease, 2)
        ask(journal, lease, 3)
        journal.release(lease)  # deciding is not fenced: the run usually waits unleased
        clock.advance(10)
        approved = journal.decide_approval("run-1", 2, approved=True, by="carol", reason="customer verified ✓")
        assert (approved.status, approved.decided_by, approved.decided_at, approved.reason) == (
            "approved",
            "carol",
            clock.now,
            "customer verified ✓",
        )
        assert (approved.requested_at, approved.expires_at) == (clock.now - 10, clock.now + 50)
        assert journal.approval("run-1", 2) == approved
        clock.advance(1)
        denied = journal.decide_approval("run-1", 3, approved=False, by="dave")
        assert (denied.status, denied.decided_by, denied.decided_at, denied.reason) == (
            "denied",
            "dave",
            clock.now,
            "",
        )
        assert journal.approval("run-1", 3) == denied
        assert journal.list_approvals() == []
        assert journal.list_approvals("approved") == [approved]
        assert journal.list_approvals("denied") == [denied]

    def test_a_decision_is_final(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        ask(journal, lease, 2)
        ask(journal, lease, 3)
        approved = journal.decide_approval("run-1", 2, approved=True, by="carol")
        denied = journal.decide_approval("run-1", 3, approved=False, by="dave", reason="too much")
        clock.advance(1)
        for approve in (True, False):
            with pytest.raises(ApprovalError, match="already approved by carol"):
                journal.decide_approval("run-1", 2, approved=approve, by="erin")
            with pytest.raises(ApprovalError, match="already denied by dave"):
                journal.decide_approval("run-1", 3, approved=approve, by="erin")
        assert journal.approval("run-1", 2) == approved
        assert journal.approval("run-1", 3) == denied

    def test_deciding_what_was_not_requested_or_without_a_decider(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        with pytest.raises(ApprovalError, match=r"no approval .*step 2 of run 'run-1'"):
            journal.decide_approval("run-1", 2, approved=True, by="carol")
        with pytest.raises(ApprovalError, match="'nope'"):
            journal.decide_approval("nope", 2, approved=True, by="carol")
        pending = ask(journal, lease, 2)
        for by in ("", "   "):
            with pytest.raises(ApprovalError, match="by"):
                journal.decide_approval("run-1", 2, approved=True, by=by)
        assert journal.approval("run-1", 2) == pending
        assert journal.approval("run-1", 3) is None

    def test_an_approval_expires(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        asked = ask(journal, lease, 2, ttl_s=10)
        ask(journal, lease, 3, ttl_s=10)
        clock.advance(9.5)
        assert [a.step_id for a in journal.list_approvals()] == [3, 2]
        assert journal.list_approvals("expired") == []
        clock.advance(0.5)  # at expires_at: expired
        assert asked.status_at(clock.now) == "expired"
        assert journal.list_approvals() == []
        assert journal.list_approvals("expired") == [journal.approval("run-1", 3), asked]  # stored pending still
        with pytest.raises(ApprovalError, match="expired") as info:
            journal.decide_approval("run-1", 2, approved=True, by="carol")
        assert "carol" not in str(info.value)
        stored = journal.approval("run-1", 2)
        assert stored == attrs.evolve(asked, status="expired")  # no decider, no decision time
        with pytest.raises(ApprovalError, match="expired"):
            journal.decide_approval("run-1", 2, approved=False, by="dave")
        clock.advance(-60)  # stored as expired: even a clock that goes back does not re-open it
        assert journal.approval("run-1", 2) == stored
        assert [a.step_id for a in journal.list_approvals("expired")] == [2]
        assert [a.step_id for a in journal.list_approvals()] == [3]  # never decided: pending again
        assert ask(journal, lease, 2) == stored  # asking again does not re-open it either

    def test_request_approval_refuses_a_bad_ttl_or_args(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        for ttl in (0, -1.0, math.nan, math.inf):
            with pytest.raises(JournalRecordError, match="ttl_s"):
                ask(journal, lease, 2, ttl_s=ttl)
        with pytest.raises(JournalRecordError, match="args"):
            ask(journal, lease, 2, args={"when": b"bytes"})
        assert journal.approval("run-1", 2) is None
        assert journal.list_approvals(None) == []

    def test_list_approvals_newest_first_by_status(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        one = new_run(journal)
        two = new_run(journal, "run-2")
        ask(journal, one, 1)
        clock.advance(1)
        ask(journal, two, 1)
        ask(journal, one, 2)  # same requested_at: the later request comes first
        clock.advance(1)
        ask(journal, two, 2, ttl_s=5)
        clock.advance(-10)
        ask(journal, two, 3)  # the clock went back: oldest
        clock.advance(10)
        journal.decide_approval("run-2", 1, approved=True, by="carol")
        journal.decide_approval("run-1", 1, approved=False, by="dave")

        def listed(status: str | None, limit: int = 50) -> list[tuple[str, int]]:
            return [(a.run_id, a.step_id) for a in journal.list_approvals(status, limit=limit)]

        every = [("run-2", 2), ("run-1", 2), ("run-2", 1), ("run-1", 1), ("run-2", 3)]
        assert listed(None) == every
        assert listed("pending") == [("run-2", 2), ("run-1", 2), ("run-2", 3)]
        assert listed("approved") == [("run-2", 1)]
        assert listed("denied") == [("run-1", 1)]
        assert listed("expired") == []
        clock.advance(5)  # run-2 step 2 expires
        assert listed("pending") == [("run-1", 2), ("run-2", 3)]
        assert listed("expired") == [("run-2", 2)]
        assert listed(None) == every
        assert listed(None, limit=2) == every[:2]
        assert listed("pending", limit=1) == [("run-1", 2)]
        assert listed(None, limit=0) == []
        assert journal.list_approvals() == journal.list_approvals("pending")  # pending is the default

    def test_list_approvals_refuses_an_unknown_status(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        ask(journal, new_run(journal), 2)
        for status in ("rejected", "PENDING", ""):
            with pytest.raises(ValueError, match=repr(status)) as info:
                journal.list_approvals(status)
            assert all(name in str(info.value) for name in ("pending", "approved", "denied", "expired"))

    def test_concurrent_deciders_exactly_one_wins(
        self, make_journal: MakeJournal, child_factory: Callable[[], Journal] | None
    ) -> None:
        journal = make_journal()
        lease = new_run(journal, ttl_s=600)
        deciders, steps = 8, 15
        for step_id in range(1, steps + 1):
            ask(journal, lease, step_id, ttl_s=600)
        # A backend shared between handles gets one handle (one connection) per thread.
        handles = [make_journal() if child_factory is not None else journal for _ in range(deciders)]
        barrier = threading.Barrier(deciders)
        results: list[tuple[int, int, object]] = []
        lock = threading.Lock()

        def decide(n: int) -> None:
            for step_id in range(1, steps + 1):
                barrier.wait(timeout=30)
                try:
                    outcome: object = handles[n].decide_approval(
                        "run-1", step_id, approved=n % 2 == 0, by=f"approver-{n}"
                    )
                except ApprovalError as exc:
                    outcome = exc
                except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
                    outcome = RuntimeError(repr(exc))
                with lock:
                    results.append((step_id, n, outcome))

        threads = [threading.Thread(target=decide, args=(n,)) for n in range(deciders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) == deciders * steps
        for step_id in range(1, steps + 1):
            mine = [(n, out) for s, n, out in results if s == step_id]
            won = [(n, out) for n, out in mine if isinstance(out, ApprovalRecord)]
            assert len(won) == 1, (step_id, mine)
            (winner, record) = won[0]
            assert isinstance(record, ApprovalRecord)
            assert (record.status, record.decided_by) == (
                "approved" if winner % 2 == 0 else "denied",
                f"approver-{winner}",
            )
            for n, out in mine:
                if n != winner:
                    assert isinstance(out, ApprovalError), out
                    assert f"already {record.status} by approver-{winner}" in str(out)
            assert journal.approval("run-1", step_id) == record

    def test_a_fenced_request_approval_writes_nothing(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        stale = new_run(journal, ttl_s=10)
        clock.advance(11)
        fresh = journal.acquire("run-1", BOB)
        with pytest.raises(FencedError, match=BOB) as info:
            ask(journal, stale, 2)
        assert (info.value.epoch, info.value.current_epoch, info.value.holder) == (1, 2, BOB)
        assert journal.approval("run-1", 2) is None
        assert journal.list_approvals(None) == []
        asked = ask(journal, fresh, 2)
        with pytest.raises(FencedError):  # fenced even when the step already has one
            ask(journal, stale, 2)
        journal.release(fresh)
        with pytest.raises(FencedError, match="released"):
            ask(journal, fresh, 3)
        with pytest.raises(RunNotFoundError):
            ask(journal, Lease("nope", ALICE, 1, clock.now + 60), 2)
        assert journal.list_approvals(None) == [asked]
        assert journal.approval("nope", 2) is None

    # --- steps ------------------------------------------------------------------------

    def test_step_records_round_trip_in_order(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal)
        args = {"order_id": "A-17", "note": "naïve 退款 🚀", "lines": [1, 2], "meta": {"x": None}}
        written = [
            intent(1, args=args, idempotency_key="run-1:1"),
            outcome(
                1,
                args=args,
                idempotency_key="run-1:1",
                result=None,
                duration_s=0.5,
                cost_usd=0.001,
                attempts=1,
                verdict={"passed": True, "score": 1.0, "reason": ""},
                ts=123.0,
            ),
            intent(2, args={}),
            outcome(
                2,
                args={},
                status="failed",
                result={"refund": {"id": "R-1", "ok": "ja ✓"}},
                error="ToolError: card declined — réessayer",
                attempts=3,
            ),
            intent(3),
            outcome(3, result=["a", 1, 2.5, True, None]),
            intent(4),
            outcome(4, result="plain text"),
            intent(5),
            outcome(5, result=0),
        ]
        for record in written:
            (journal.intent if record.phase == "intent" else journal.outcome)(lease, record)
        steps = journal.load("run-1").steps
        stamped = [r if r.ts else StepRecord(**{**fields_of(r), "ts": clock.now}) for r in written]
        assert list(steps) == stamped
        assert steps[1].ts == 123.0 and steps[0].ts == clock.now
        assert journal.load("run-1").run.updated_at == clock.now

    def test_values_round_trip_as_json(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        journal.outcome(
            lease,
            outcome(
                1,
                status=StepStatus.SKIPPED,
                args={"ids": (1, 2)},
                result=(3, {"k": (4,)}),
                duration_s=2,
                attempts=1,
            ),
        )
        (step,) = journal.load("run-1").steps
        assert step.status == "skipped" and type(step.status) is str
        assert step.args == {"ids": [1, 2]} and step.result == [3, {"k": [4]}]
        assert step.duration_s == 2.0 and type(step.duration_s) is float

    def test_value_that_is_not_json_is_refused_and_nothing_written(
        self, make_journal: MakeJournal
    ) -> None:
        journal = make_journal()
        lease = new_run(journal)
        journal.intent(lease, intent(1))
        with pytest.raises(JournalRecordError, match="result of step 1"):
            journal.outcome(lease, outcome(1, result=object()))
        with pytest.raises(JournalRecordError, match="args of step 2"):
            journal.intent(lease, intent(2, args={"when": b"bytes"}))
        assert [r.phase for r in journal.load("run-1").steps] == ["intent"]

    def test_wrong_phase_is_refused(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        with pytest.raises(JournalRecordError, match="phase"):
            journal.intent(lease, outcome(1))
        with pytest.raises(JournalRecordError, match="phase"):
            journal.outcome(lease, intent(1))
        assert journal.load("run-1").steps == ()

    def test_forward_and_compensation_helpers(self, make_journal: MakeJournal) -> None:
        journal = make_journal(clock=FakeClock())
        lease = new_run(journal)
        i1, o1 = intent(1, attempts=1), outcome(1, status="failed", attempts=1)
        i1b = intent(1, attempts=2)
        o2 = outcome(2, status="skipped")
        i3, o3 = intent(3), outcome(3, result={"refund_id": "R-9"})
        c3i, c3o = intent(3, "compensation"), outcome(3, "compensation", status="compensated")
        c1i = intent(1, "compensation")
        for record in (i1, o1, i1b, o2, i3, o3, c3i, c3o, c1i):
            (journal.intent if record.phase == "intent" else journal.outcome)(lease, record)
        state = journal.load("run-1")
        stamp = state.steps[0].ts

        def at(r: StepRecord) -> StepRecord:
            return StepRecord(**{**fields_of(r), "ts": stamp})

        assert state.forward(1) == (at(i1b), None)  # the retry started and did not finish
        assert state.forward(2) == (None, at(o2))
        assert state.forward(3) == (at(i3), at(o3))
        assert state.forward(9) == (None, None)
        assert state.compensation(3) == (at(c3i), at(c3o))
        assert state.compensation(1) == (at(c1i), None)
        assert state.compensation(2) == (None, None)
        assert [(r.step_id, r.kind, r.phase) for r in state.steps] == [
            (1, "forward", "intent"),
            (1, "forward", "outcome"),
            (1, "forward", "intent"),
            (2, "forward", "outcome"),
            (3, "forward", "intent"),
            (3, "forward", "outcome"),
            (3, "compensation", "intent"),
            (3, "compensation", "outcome"),
            (1, "compensation", "intent"),
        ]

    # --- leases and fencing -------------------------------------------------------------

    def test_write_steps_appends_every_record_in_order_in_one_go(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        journal.intent(lease, intent(1))
        batch = [outcome(1), intent(2), outcome(2, result={"refund_id": "R-2"}), intent(3)]
        journal.write_steps(lease, batch)
        journal.write_steps(lease, [])  # nothing to write: nothing written, no error
        steps = journal.load("run-1").steps
        assert [(r.step_id, r.phase) for r in steps] == [(1, "intent"), (1, "outcome"), (2, "intent"),
                                                         (2, "outcome"), (3, "intent")]
        assert steps[3].result == {"refund_id": "R-2"}
        assert all(r.ts > 0 for r in steps)

    def test_write_steps_writes_nothing_when_one_record_is_bad(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal)
        before = journal.load("run-1")
        bad = [
            [outcome(1), intent(2, args={"x": object()})],  # not JSON
            [intent(1), attrs.evolve(intent(2), kind="sideways")],  # no such kind
            [intent(1), attrs.evolve(intent(2), phase="later")],  # no such phase
        ]
        for records in bad:
            with pytest.raises(JournalRecordError):
                journal.write_steps(lease, records)
        assert journal.load("run-1") == before

    def test_a_fenced_write_steps_writes_nothing(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        stale = new_run(journal, ttl_s=10)
        clock.advance(10.5)
        journal.acquire("run-1", BOB, ttl_s=10)
        before = journal.load("run-1")
        with pytest.raises(FencedError, match=BOB):
            journal.write_steps(stale, [intent(1), outcome(1)])
        with pytest.raises(FencedError, match=BOB):
            journal.write_steps(stale, [intent(1)])
        assert journal.load("run-1") == before
        with pytest.raises(RunNotFoundError):
            journal.write_steps(attrs.evolve(stale, run_id="run-nope"), [intent(1), outcome(1)])

    def test_fencing_after_takeover(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        stale = new_run(journal, ttl_s=10)
        journal.intent(stale, intent(1))
        clock.advance(10.5)
        fresh = journal.acquire("run-1", BOB, ttl_s=10)
        assert (fresh.owner, fresh.epoch, fresh.expires_at) == (BOB, 2, clock.now + 10)
        before = journal.load("run-1")

        writes: list[Callable[[], object]] = [
            lambda: journal.intent(stale, intent(2)),
            lambda: journal.outcome(stale, outcome(1)),
            lambda: journal.set_status(stale, "succeeded", "stale says done"),
            lambda: journal.renew(stale, 60),
            lambda: journal.release(stale),
        ]
        for write in writes:
            with pytest.raises(FencedError, match=BOB) as info:
                write()
            assert (info.value.epoch, info.value.current_epoch, info.value.holder) == (1, 2, BOB)
        assert journal.load("run-1") == before
        assert before.run.owner == BOB and before.run.epoch == 2

        journal.outcome(fresh, outcome(1))
        journal.set_status(fresh, "succeeded")
        after = journal.load("run-1")
        assert after.run.status == "succeeded" and len(after.steps) == 2

    def test_acquire_refused_while_another_owner_holds_an_unexpired_lease(
        self, make_journal: MakeJournal
    ) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, ttl_s=30)
        clock.advance(29)
        with pytest.raises(LeaseHeldError) as info:
            journal.acquire("run-1", BOB)
        assert ALICE in str(info.value) and "run-1" in str(info.value)
        assert (info.value.holder, info.value.expires_at) == (ALICE, lease.expires_at)
        run = journal.load("run-1").run
        assert (run.owner, run.epoch) == (ALICE, 1)
        journal.intent(lease, intent(1))  # the holder is unaffected

    def test_acquire_allowed_after_expiry(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        new_run(journal, ttl_s=30)
        clock.advance(30)
        lease = journal.acquire("run-1", BOB, ttl_s=5)
        assert (lease.epoch, lease.expires_at) == (2, clock.now + 5)
        run = journal.load("run-1").run
        assert (run.owner, run.epoch, run.lease_expires_at) == (BOB, 2, lease.expires_at)

    def test_renew_extends_the_lease(self, make_journal: MakeJournal) -> None:
        clock = FakeClock()
        journal = make_journal(clock=clock)
        lease = new_run(journal, ttl_s=10)
        clock.advance(8)
        renewed = journal.renew(lease, ttl_s=10)
        assert renewed == Lease("run-1", ALICE, 1, clock.now + 10)
        clock.advance(8)  # past the first expiry, within the renewed one
        with pytest.raises(LeaseHeldError):
            journal.acquire("run-1", BOB)
        journal.intent(lease, intent(1))  # renewing keeps the epoch: both objects still write

    def test_same_owner_reacquires_at_a_new_epoch(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        first = new_run(journal, ttl_s=300)
        second = journal.acquire("run-1", ALICE)
        assert (second.owner, second.epoch) == (ALICE, 2)
        third = journal.acquire("run-1", ALICE)
        assert third.epoch == 3
        journal.intent(third, intent(1))
        journal.outcome(third, outcome(1))
        for old in (first, second):
            with pytest.raises(FencedError):
                journal.intent(old, intent(2))
        assert len(journal.load("run-1").steps) == 2

    def test_release(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        lease = new_run(journal, ttl_s=300)
        journal.release(lease)
        journal.release(lease)  # twice is fine
        run = journal.load("run-1").run
        assert (run.owner, run.epoch) == ("", 1)
        with pytest.raises(FencedError, match="released"):
            journal.intent(lease, intent(1))
        with pytest.raises(FencedError):
            journal.set_status(lease, "failed")
        with pytest.raises(FencedError):
            journal.renew(lease)
        taken = journal.acquire("run-1", BOB, ttl_s=300)  # free at once, no expiry wait
        assert taken.epoch == 2
        with pytest.raises(FencedError):
            journal.release(lease)
        assert journal.load("run-1").steps == ()

    def test_acquire_refused_while_a_live_local_process_holds_it(
        self, make_journal: MakeJournal
    ) -> None:
        journal = make_journal()
        proc, holder = spawn_owner_process("sleep")
        try:
            new_run(journal, owner=holder, ttl_s=300)
            with pytest.raises(LeaseHeldError, match=holder):
                journal.acquire("run-1", make_owner())
        finally:
            proc.kill()
            proc.wait()
        lease = journal.acquire("run-1", make_owner())  # now it is gone
        assert lease.epoch == 2

    def test_acquire_from_a_dead_local_process_is_immediate(
        self, make_journal: MakeJournal
    ) -> None:
        journal = make_journal()
        proc, holder = spawn_owner_process()
        assert proc.wait() == 0
        assert holder.split(":")[0] == socket.gethostname().replace(":", "_")
        new_run(journal, owner=holder, ttl_s=3600)
        lease = journal.acquire("run-1", BOB)
        assert (lease.owner, lease.epoch) == (BOB, 2)

    @pytest.mark.skipif(not HAS_PROC, reason="needs /proc to tell process start times apart")
    def test_a_recycled_pid_does_not_count_as_alive(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        host, pid, start = make_owner().split(":")
        new_run(journal, owner=f"{host}:{pid}:{int(start) - 1}", ttl_s=3600)  # same pid, earlier
        new_run(journal, "run-2", owner=f"{host}:{pid}:{start}:other-tag", ttl_s=3600)
        assert journal.acquire("run-1", BOB).epoch == 2
        with pytest.raises(LeaseHeldError):  # this process is alive: a tagged owner of it holds
            journal.acquire("run-2", BOB)

    @pytest.mark.skipif(not HAS_PROC, reason="needs /proc to see zombie processes")
    def test_an_exited_unreaped_holder_is_dead(self, make_journal: MakeJournal) -> None:
        journal = make_journal()
        proc, holder = spawn_owner_process("sleep")
        try:
            new_run(journal, owner=holder, ttl_s=3600)
            os.kill(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while proc_state(proc.pid) != "Z" and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc_state(proc.pid) == "Z"
            assert journal.acquire("run-1", BOB).epoch == 2
        finally:
            proc.kill()
            proc.wait()
