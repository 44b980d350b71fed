"""Resume races, fencing, rollback after a late failure, and rollback interrupted by a crash.

Every process here is real: forkserver children or new interpreters
(``tests.durable.harness``) and the ``agentkeel`` command itself. Processes are
synchronized by polling files (the call log, a gate file, the journal) with
timeouts, never by sleeping for a guessed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agentkeel.errors import AgentkeelError
from agentkeel.journal.sqlite import SQLiteJournal
from agentkeel.markers import hookimpl
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.types import AgentRequest, RunStatus, StepStatus
from agentkeel_support.tools import lookup_order

from tests.durable.harness import (
    EXIT_REFUSED,
    PERMISSIONS,
    USER,
    Child,
    ForkedChild,
    HarnessPlugin,
    History,
    Paths,
    build_system,
    check_invariants,
    done_steps,
    finish_child,
    load_state,
    read_calls,
    read_shop,
    run_child,
    start_child,
    wire_plan,
)

POLL_TIMEOUT_S = 60.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = POLL_TIMEOUT_S) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def waiting_at_gate(paths: Paths, label: str) -> bool:
    return any(c["label"] == label and c["phase"] == "waiting" for c in read_calls(paths))


def agentkeel_cli(paths: Paths, *args: str) -> subprocess.CompletedProcess[str]:
    """The ``agentkeel`` command (embedded defaults, entry-point plugins) on this scenario's state."""
    return subprocess.run(
        [sys.executable, "-m", "agentkeel", *args], env=paths.env("cli"), capture_output=True, text=True,
        timeout=POLL_TIMEOUT_S, check=False,
    )


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """A scenario's state, with this process pointed at it too (for in-process systems)."""
    paths = Paths.under(tmp_path / "harness")
    for name, value in paths.env("in-process").items():
        if name.startswith(("AGENTKEEL_", "HARNESS_")):
            monkeypatch.setenv(name, value)
    return paths


def crashed(paths: Paths, run_id: str, kinds: list[str], crash: str) -> History:
    """Run ``kinds`` as ``run_id`` in a child that is killed at ``crash``."""
    paths.write_plan(kinds)
    child = run_child(paths, "run", run_id, "p0", crash)
    assert child.killed, f"{crash} never fired: {child.out}"
    return History(run_id, tuple(kinds), [child])


# --- two resumers ---------------------------------------------------------------------------------------


def test_two_processes_resume_the_same_run_one_wins_the_other_is_refused(paths: Paths) -> None:
    kinds = ["refund", "email", "gate", "email"]
    history = crashed(paths, "race", kinds, "finished:2")
    gate = paths.root / "gate"
    done = done_steps(load_state(paths, "race"))
    history.done_before.update({"A": done, "B": done})
    procs = {label: start_child(paths, "resume", "race", label, gate=gate) for label in ("A", "B")}

    def one_refused_one_waiting() -> tuple[str, str] | None:
        for loser, winner in (("A", "B"), ("B", "A")):
            if procs[loser].poll() is not None and waiting_at_gate(paths, winner):
                return loser, winner
        return None

    loser, winner = wait_for(one_refused_one_waiting, "one resumer refused while the other holds the run")
    gate.touch()
    lost, won = finish_child(procs[loser], loser), finish_child(procs[winner], winner)
    assert lost.returncode == EXIT_REFUSED, lost.err
    assert "is held by" in lost.answer["refused"] and "race" in lost.answer["refused"]
    assert won.returncode == 0 and won.answer["status"] == "succeeded", won.err
    assert not [c for c in read_calls(paths) if c["label"] == loser]  # the loser touched nothing
    history.children += [lost, won]
    check_invariants(paths, history)


def test_cli_resume_is_refused_while_another_process_holds_the_run(paths: Paths) -> None:
    crashed(paths, "held", ["refund", "gate", "email"], "finished:1")
    gate = paths.root / "gate"
    holder = ForkedChild(paths, "resume", "held", "holder", gate=gate)
    wait_for(lambda: waiting_at_gate(paths, "holder"), "the holder to reach the gate")

    refused = agentkeel_cli(paths, "resume", "held", "--json")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "run 'held' is held by" in refused.stderr and "try again" in refused.stderr
    listed = json.loads(agentkeel_cli(paths, "runs", "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in listed] == [("held", "running")]

    gate.touch()
    assert holder.finish().answer["status"] == "succeeded"
    shown = agentkeel_cli(paths, "show", "held", "--json")
    assert json.loads(shown.stdout)["status"] == "succeeded"
    _, emails = read_shop(paths)
    assert len(emails) == 1


def test_a_stale_process_is_fenced_after_its_lease_expires_and_another_takes_over(paths: Paths) -> None:
    crashed(paths, "stale", ["refund", "gate", "email"], "finished:1")
    gate = paths.root / "gate"
    stale = ForkedChild(paths, "resume", "stale", "stale", gate=gate, ttl=1.0)
    wait_for(lambda: waiting_at_gate(paths, "stale"), "the stale process to reach the gate")
    # A process frozen mid-call (stopped, swapped out, cut off) renews nothing: its lease runs out.
    # (A live process renews its lease while a call runs, so only a frozen one goes stale.)
    os.kill(stale.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: load_state(paths, "stale").run.lease_expires_at < time.time(), "its lease to expire")
        taker = run_child(paths, "resume", "stale", "taker")  # re-runs the idempotent gate step, then emails
        assert taker.answer["status"] == "succeeded", taker.answer
        gate.touch()
    finally:
        os.kill(stale.pid, signal.SIGCONT)
    late = stale.finish()
    assert late.returncode != 0 and late.answer["error"] == "FencedError", late.answer

    state = load_state(paths, "stale")
    assert state.run.status == "succeeded"
    gate_outcomes = [r for r in state.steps if r.step_id == 2 and r.phase == "outcome"]
    assert len(gate_outcomes) == 1  # the stale process could not journal its outcome
    calls = read_calls(paths)
    assert not [c for c in calls if c["label"] == "stale" and c["tag"] == "s3"]  # nor run the next step
    _, emails = read_shop(paths)
    assert len(emails) == 1


# --- rollback -------------------------------------------------------------------------------------------


async def test_a_late_failure_rolls_back_and_restores_the_shop(paths: Paths) -> None:
    kinds = ["lookup", "refund", "refund", "email", "bounce"]
    async with make_system(HarnessPlugin(), ScriptedPlanner(wire_plan(kinds)), principals={USER: PERMISSIONS},
                           config={"retry": {"base_delay_s": 0.0}}) as system:
        response = await system.run(AgentRequest(message="late failure", user_id=USER, run_id="late"))
    assert response.status is RunStatus.FAILED
    assert [s.status for s in response.steps] == [
        StepStatus.SUCCEEDED, StepStatus.COMPENSATED, StepStatus.COMPENSATED, StepStatus.SUCCEEDED, StepStatus.FAILED
    ]
    assert "bounced" in response.message and "rolled back step(s) 3, 2" in response.message
    refunds, emails = read_shop(paths)
    assert len(refunds) == 2 and {r["status"] for r in refunds} == {"cancelled"}
    for order_id in {r["order_id"] for r in refunds}:
        assert lookup_order(order_id)["refunded"] == 0  # the shop is as it was
    assert [e["subject"][:4] for e in emails] == ["[s4]"]  # an email cannot be taken back
    state = load_state(paths, "late")
    assert [r.step_id for r in state.steps if r.kind == "compensation" and r.phase == "intent"] == [3, 2]
    assert state.run.status == "failed"


def test_cli_run_of_a_plan_whose_late_step_fails_shows_the_compensation(paths: Paths) -> None:
    result = agentkeel_cli(paths, "run", "refund order 1005 and email the customer", "--user", "demo")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "issue_refund" in result.stdout and "compensated" in result.stdout
    assert "rolled back step(s) 2" in result.stdout
    refunds, emails = read_shop(paths)
    assert [(r["order_id"], r["status"]) for r in refunds] == [("1005", "cancelled")] and not emails


@pytest.mark.parametrize(
    ("first_mode", "crash"),
    [("run", "comp_before:2"), ("run", "comp_after:2"), ("run", "compensated:2"), ("run", "comp_after:1"),
     ("rollback", "comp_after:2"), ("rollback", "comp_before:1")],
)
def test_a_rollback_interrupted_by_a_crash_completes_on_resume(paths: Paths, first_mode: str, crash: str) -> None:
    """Killed inside the compensator (or just after it was journaled); resume finishes the rollback."""
    kinds = ["refund", "refund", "bounce" if first_mode == "run" else "email"]
    paths.write_plan(kinds)
    history = History("rb", tuple(kinds))
    if first_mode == "rollback":
        history.children.append(run_child(paths, "run", "rb", "p0"))
        assert history.children[0].answer["status"] == "succeeded"
    first = run_child(paths, first_mode, "rb", f"p{len(history.children)}", crash)
    assert first.killed
    history.children.append(first)
    final = "failed" if first_mode == "run" else "rolled_back"
    crashed = load_state(paths, "rb").run
    # The journal says what the run ends as once compensated: the abort's status, or rolled_back if asked.
    assert (crashed.status, crashed.then_status) == ("rolling_back", final)
    before = {r["refund_id"]: r["cancelled_at"] for r in read_shop(paths)[0] if r["status"] == "cancelled"}

    resumer = run_child(paths, "resume", "rb", "resumer")
    assert resumer.answer["status"] == final, resumer.answer
    refunds, _ = read_shop(paths)
    assert len(refunds) == 2 and {r["status"] for r in refunds} == {"cancelled"}
    for refund_id, cancelled_at in before.items():  # cancelled once: not cancelled again on resume
        assert next(r for r in refunds if r["refund_id"] == refund_id)["cancelled_at"] == cancelled_at
    state = load_state(paths, "rb")
    for step in (1, 2):
        undone = [r for r in state.steps if r.step_id == step and r.kind == "compensation" and r.phase == "outcome"]
        assert [r.status for r in undone] == ["succeeded"], undone
    if first_mode == "run":
        history.children.append(resumer)
        check_invariants(paths, history)


def test_runs_json_lists_a_crashed_run_as_running_newest_first(paths: Paths) -> None:
    paths.write_plan(["refund", "email"])
    assert run_child(paths, "run", "older", "p0").answer["status"] == "succeeded"
    assert run_child(paths, "run", "newer", "p1", "finished:1").killed

    listed = agentkeel_cli(paths, "runs", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(r["run_id"], r["status"]) for r in json.loads(listed.stdout)] == [
        ("newer", "running"), ("older", "succeeded")]

    assert run_child(paths, "resume", "newer", "p2").answer["status"] == "succeeded"
    after = json.loads(agentkeel_cli(paths, "runs", "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in after] == [("newer", "succeeded"), ("older", "succeeded")]


# --- regressions: bugs the harness found in core, now fixed ------------------------------------------


class _JournalLosingTheRace(SQLiteJournal):
    """A journal whose ``acquire`` first lets another process finish the run (a resumer that lost the race)."""

    def __init__(self, home: Path, paths: Paths) -> None:
        super().__init__(home)
        self.paths = paths
        self.other: Child | None = None

    def acquire(self, run_id: str, owner: str, ttl_s: float = 30.0) -> Any:
        self.other = run_child(self.paths, "resume", run_id, "other")
        return super().acquire(run_id, owner, ttl_s)


class _LosingTheRace:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    @hookimpl(tryfirst=True)
    def agentkeel_open_journal(self, config: Any) -> _JournalLosingTheRace:
        return _JournalLosingTheRace(config.home, self.paths)


async def test_a_resumer_that_gets_the_lease_after_the_run_finished_leaves_it_alone(paths: Paths) -> None:
    paths.write_plan(["refund", "email"])
    assert run_child(paths, "run", "late", "p0").answer["status"] == "succeeded"
    assert run_child(paths, "rollback", "late", "p1", "comp_before:1").killed
    async with make_system(HarnessPlugin(), _LosingTheRace(paths), principals={USER: PERMISSIONS}) as system:
        response = await system.resume("late")
        other = system.journal.other  # type: ignore[attr-defined]
    assert other is not None and other.answer["status"] == "rolled_back"
    refunds, _ = read_shop(paths)
    assert [r["status"] for r in refunds] == ["cancelled"]
    assert load_state(paths, "late").run.status == "rolled_back"
    assert response.status is RunStatus.ROLLED_BACK


def test_rolling_back_a_crashed_run_undoes_or_reports_the_step_in_flight(paths: Paths) -> None:
    paths.write_plan(["refund", "refund", "email"])
    assert run_child(paths, "run", "inflight", "p0", "after:2").killed  # refund 2 issued, no outcome
    answer = run_child(paths, "rollback", "inflight", "p1").answer
    refunds, _ = read_shop(paths)
    left = [r for r in refunds if r["status"] == "issued"]
    assert answer["status"] != "rolled_back" or not left, f"reported {answer['status']} but {left} still issued"


async def test_rollback_without_the_steps_tool_is_not_reported_done(paths: Paths) -> None:
    paths.write_plan(["refund", "email"])
    assert run_child(paths, "run", "notool", "p0").answer["status"] == "succeeded"
    async with make_system(principals={USER: PERMISSIONS}) as system:  # no harness plugin: no h_refund
        with pytest.raises(AgentkeelError, match="h_refund"):
            await system.rollback("notool")
    refunds, _ = read_shop(paths)
    assert refunds[0]["status"] == "issued"  # nothing was claimed, nothing was changed
    assert load_state(paths, "notool").run.status == "succeeded"


async def test_resume_without_the_steps_tool_fails_with_an_error_that_names_it(paths: Paths) -> None:
    crashed(paths, "notool", ["refund", "email"], "finished:1")
    async with make_system(principals={USER: PERMISSIONS}) as system:
        with pytest.raises(AgentkeelError, match="h_email"):
            await system.resume("notool")
    assert load_state(paths, "notool").run.owner == ""


def test_build_system_matches_the_child(paths: Paths) -> None:
    """The in-process helper registers the same tools the children use (keeps the tests above honest)."""
    system = build_system()
    assert {"h_lookup", "h_refund", "h_cancel", "h_email", "h_gate"} <= set(system.tools.all())
    assert system.tools["h_refund"].accepts_key and not system.tools["h_refund"].idempotent
    assert system.tools["h_refund"].rollback == "h_cancel"
    assert not system.tools["h_email"].retry_safe and system.tools["h_lookup"].idempotent
