"""The crash harness of issue 4: a 10-step plan killed at every step boundary and mid-step.

Each case runs the plan in a child process that SIGKILLs itself at one point
(see ``tests.durable.harness``), resumes the run in further child processes
until one survives, checks every invariant against the journal, the shop
database and the call log, and resumes once more in this process to show a
finished (or in-doubt) run is left alone. A run left in doubt is then settled
the way an operator would (look in the shop, ``resume --resolve STEP=...``)
and checked again: every email still went out exactly once.

Plans: ``ok`` mixes idempotent lookups, key-taking refunds and never-twice
emails; ``late_fail`` is the same with a last email that bounces, so the run
aborts and its refunds are compensated (crash points inside the rollback too).
The ``random-*`` cases chain up to three crashes (seeded).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.durable.harness import (
    NEVER_TWICE,
    History,
    Paths,
    Revised,
    assert_resume_changes_nothing,
    check_invariants,
    crash_points,
    drive,
    expected_end,
    log_call,
    settle,
)

PLAN_OK = ("lookup", "refund", "email", "lookup", "refund", "email", "refund", "lookup", "email", "refund")
PLAN_LATE_FAIL = (*PLAN_OK[:9], "bounce")
PLANS = {"ok": PLAN_OK, "late_fail": PLAN_LATE_FAIL}
RANDOM_CASES = 16
RANDOM_SEED = 20240604


def _matrix() -> list[Any]:
    cases = [pytest.param(name, (point,), id=f"{name}-{point}")
             for name in PLANS for point in crash_points(PLANS[name])]
    rng = random.Random(RANDOM_SEED)
    for i in range(RANDOM_CASES):
        name = rng.choice(sorted(PLANS))
        chain = tuple(rng.sample(crash_points(PLANS[name]), rng.randint(2, 3)))
        cases.append(pytest.param(name, chain, id=f"random{i}-{name}-{'+'.join(chain)}"))
    return cases


@pytest.mark.parametrize(("plan", "crashes"), _matrix())
async def test_crash_then_resume(
    plan: str, crashes: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = Paths.under(tmp_path / "harness")
    kinds = PLANS[plan]
    history = drive(paths, "harness-run", kinds, crashes)
    assert history.children[0].killed, f"crash point {crashes[0]} never fired: {history.children[0].answer}"
    state = check_invariants(paths, history)
    if state.run.status == "in_doubt":
        _, step = expected_end(kinds, history.events())
        assert step is not None and kinds[step - 1] in NEVER_TWICE
        assert "A human must check whether h_email took effect" in state.run.detail
        await assert_resume_changes_nothing(paths, "harness-run", monkeypatch.setenv)  # still in doubt
        settle(paths, history)  # the operator checks the shop and says whether the email went out
        state = check_invariants(paths, history)
        assert state.run.status in ("succeeded", "failed")
    await assert_resume_changes_nothing(paths, "harness-run", monkeypatch.setenv)


# --- rounds and replans: every step boundary, and between revisions -------------------------------

REVISED = {
    # an adaptive plan: round 1 looks up and refunds, round 2 emails and refunds again
    "round": Revised(("lookup", "refund"), ("email", "refund"), "round"),
    # a replan: the email bounces at step 3, the new plan emails the customer instead
    "replan": Revised(("lookup", "refund", "bounce"), ("email",), "replan"),
}


def _revised_matrix() -> list[Any]:
    cases = []
    for name, plan in REVISED.items():
        points = ["start:1", "planning:2", "planned:2"]
        for step in range(1, len(plan.kinds) + 1):
            points += [f"before:{step}", f"after:{step}", f"finished:{step}"]
        cases += [pytest.param(name, (point,), id=f"{name}-{point}") for point in points]
    cases.append(pytest.param("replan", ("planning:2", "planned:2", "after:4"), id="replan-chain"))
    cases.append(pytest.param("round", ("finished:2", "planning:2", "planned:2"), id="round-chain"))
    return cases


@pytest.mark.parametrize(("plan", "crashes"), _revised_matrix())
async def test_crash_between_revisions_then_resume(
    plan: str, crashes: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between rounds, between a replan and its first step, and at every step of both
    revisions: the resumed run plans what is missing once, never re-runs a completed step,
    and ends as an uninterrupted run would (the replan replaces the bounce: it succeeds)."""
    paths = Paths.under(tmp_path / "harness")
    revised = REVISED[plan]
    history = drive(paths, "revised-run", revised, crashes)
    assert history.children[0].killed, f"crash point {crashes[0]} never fired: {history.children[0].answer}"
    state = check_invariants(paths, history)
    if state.run.status == "in_doubt":
        settle(paths, history)
        state = check_invariants(paths, history)
    assert state.run.status == "succeeded", state.run.detail
    assert [r.reason for r in state.revisions] == ["initial", revised.reason]
    assert [s["step_id"] for s in state.revisions[1].plan["steps"]] == list(
        range(len(revised.first) + 1, len(revised.kinds) + 1))
    await assert_resume_changes_nothing(paths, "revised-run", monkeypatch.setenv)


def test_matrix_is_at_least_fifty_crashing_runs() -> None:
    """The issue asks for at least 50 runs killed at chosen and random points."""
    assert len(_matrix()) >= 50 + RANDOM_CASES


@pytest.mark.parametrize("crash", ["after:3", "after:5", "finished:9"])
def test_crash_then_resume_in_fresh_interpreters(crash: str, tmp_path: Path) -> None:
    """The same, with every process a new ``python -m tests.durable.harness`` (the command itself)."""
    paths = Paths.under(tmp_path / "harness")
    history = drive(paths, "fresh-run", PLAN_OK, [crash], fresh=True)
    assert history.children[0].killed
    check_invariants(paths, history)


# --- the checks can fail ----------------------------------------------------------------------------


def _finished_after_a_crash(tmp_path: Path) -> tuple[Paths, History]:
    paths = Paths.under(tmp_path / "harness")
    history = drive(paths, "check-run", PLAN_OK, ["finished:3"])
    check_invariants(paths, history)
    return paths, history


def test_invariants_catch_a_second_email(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, history = _finished_after_a_crash(tmp_path)
    with sqlite3.connect(paths.shop_db) as conn:
        conn.execute("INSERT INTO emails (email_id, to_addr, subject, body, sent_at) "
                     "VALUES ('E-twice', 'alice@example.com', '[s3] again', 'x', 'now')")
    with pytest.raises(AssertionError, match="step 3"):
        check_invariants(paths, history)


def test_invariants_catch_a_completed_step_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, history = _finished_after_a_crash(tmp_path)
    monkeypatch.setenv("HARNESS_CALL_LOG", str(paths.call_log))
    monkeypatch.setenv("HARNESS_LABEL", "p1")  # the resuming process
    log_call("h_lookup", "s1", "before")
    with pytest.raises(AssertionError, match="ran it again"):
        check_invariants(paths, history)


def test_invariants_catch_a_refund_without_its_step(tmp_path: Path) -> None:
    paths, history = _finished_after_a_crash(tmp_path)
    with sqlite3.connect(paths.shop_db) as conn:
        conn.execute("INSERT INTO refunds (refund_id, order_id, amount, idempotency_key, status, created_at) "
                     "VALUES ('R-stray', '1001', 1.0, 'check-run:99', 'issued', 'now')")
    with pytest.raises(AssertionError, match="stray refunds"):
        check_invariants(paths, history)
