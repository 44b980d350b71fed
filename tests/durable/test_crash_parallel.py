"""The crash harness on parallel plans: killed in the middle of a wave, with its siblings in flight.

The executor runs independent steps together (``[executor] max_parallel``); with
``order_effects`` (the default) a step with an effect waits for every earlier step and
every later one waits for it, so a plan runs in waves (``tests.durable.harness.waves``);
without it, only data dependencies count, and a plan without references is one wave.
Each case runs a plan in a child process that SIGKILLs itself at one point of a step
inside a wave, resumes it in further children until one survives, checks every
invariant (``check_invariants``: by waves, not by step id), settles the emails left in
doubt as an operator would (several may be: every never-twice step in flight at the
crash), and resumes once more in this process to show a finished run is left alone.

Deterministic: with ``HARNESS_WAVE_WAIT`` every tool of a wave waits until its siblings
have started (a barrier), and the siblings of the crash step are held where the case
says: ``before`` their effect, ``after`` it (effect done, outcome not journaled), or run
to ``finished`` before the crash step goes on; ``started`` is the barrier alone. The
checks then also prove the siblings were where the mode says when the crash fired.
With ``HARNESS_WAVE_ORDER=reverse`` the steps of a wave finish last step first, so the
rollback of the late-fail plans (a bounce in the last wave) undoes refunds in the
reverse of the order they finished: here, ascending step id.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest

from tests.durable.harness import (
    NEVER_TWICE,
    Child,
    History,
    Paths,
    _parallel_expectations,
    assert_resume_changes_nothing,
    check_invariants,
    drive,
    expected_compensation_order,
    expected_final,
    forward_completion_order,
    load_state,
    parallel_end,
    read_calls,
    read_shop,
    run_child,
    settle,
    waves,
)


class Plan(NamedTuple):
    kinds: tuple[str, ...]
    executor: dict[str, Any]
    wave_order: str | None = None


PLANS = {
    # order_effects (default): waves {1,2,3} {4} {5,6} {7}
    "waves": Plan(("lookup", "lookup", "lookup", "refund", "lookup", "lookup", "email"), {"max_parallel": 4}),
    # order_effects = false: one wave of five, an email among refunds and lookups
    "free": Plan(("lookup", "refund", "lookup", "refund", "email"), {"max_parallel": 8, "order_effects": False}),
    # one wave with two emails: both can be in doubt at once, settled one after the other
    "free2": Plan(("email", "refund", "lookup", "email", "refund"), {"order_effects": False}),
    # late fail, order_effects (default): waves {1,2} {3} {4,5} {6} {7: the bounce}
    "waves_late": Plan(("lookup", "lookup", "refund", "lookup", "lookup", "refund", "bounce"), {"max_parallel": 2}),
    # late fail in one wave finishing last step first: the bounce aborts while the refunds run
    "free_late": Plan(("lookup", "refund", "lookup", "refund", "refund", "bounce"),
                      {"max_parallel": 6, "order_effects": False}, "reverse"),
}

WAVES: dict[str, list[tuple[int, ...]]] = {
    "waves": [(1, 2, 3), (4,), (5, 6), (7,)],
    "free": [(1, 2, 3, 4, 5)],
    "free2": [(1, 2, 3, 4, 5)],
    "waves_late": [(1, 2), (3,), (4, 5), (6,), (7,)],
    "free_late": [(1, 2, 3, 4, 5, 6)],
}

# (plan, crash points of the run and its resumes, HARNESS_WAVE_WAIT[, crash points once an operator settled])
CASES: list[tuple[Any, ...]] = [
    # waves of lookups around a refund and an email
    ("waves", ("before:1",), "before"),
    ("waves", ("after:2",), "after"),
    ("waves", ("finished:3",), "finished"),
    ("waves", ("finished:1",), "before"),
    ("waves", ("before:5",), "started"),
    ("waves", ("after:6",), "after"),
    ("waves", ("finished:5",), "finished"),
    ("waves", ("start:1",), "before"),
    # one wave: an email among retry-safe siblings
    ("free", ("before:1",), "before"),        # the email held before sending: in doubt, not sent
    ("free", ("after:2",), "after"),          # the email sent, not journaled: in doubt, sent
    ("free", ("finished:4",), "finished"),    # everyone finished first: nothing in doubt
    ("free", ("before:5",), "before"),        # the email is the crash step
    ("free", ("after:5",), "after"),
    ("free", ("finished:5",), "before"),      # the email journaled, its siblings held: they run again
    ("free", ("finished:2",), "after"),       # the refunds made, not journaled: run again, same key
    ("free", ("after:3",), "finished"),
    ("free", ("after:2", "before:4"), "before"),  # killed again in the resume, in the same wave
    ("free", ("before:1",), "before", ("after:5",)),  # settled "not sent": its rerun is killed too, sent
    # two emails in one wave
    ("free2", ("after:2",), "after"),         # both sent, both in doubt
    ("free2", ("before:3",), "before"),       # neither sent, both in doubt
    ("free2", ("after:1",), "before"),        # the first sent (the crash step), the second held
    ("free2", ("finished:5",), "finished"),
    ("free2", ("before:2",), "before", ("after:1",)),  # settled "not sent": the rerun is killed again
    # late fail, waves: the bounce is a wave of its own
    ("waves_late", ("after:4",), "after"),
    ("waves_late", ("finished:1",), "finished"),
    ("waves_late", ("comp_before:3",), "started"),
    ("waves_late", ("compensated:6",), "started"),
    # late fail, one wave finishing in reverse: crashes in the wave and in the rollback
    ("free_late", ("before:2",), "before"),   # the bounce held in flight: in doubt, then it fails
    ("free_late", ("after:4",), "after"),
    ("free_late", ("finished:5",), "finished"),  # the bounce already failed: the run aborts on resume
    ("free_late", ("after:6",), "before"),    # the bounce is the crash step
    ("free_late", ("comp_before:4",), "started"),
    ("free_late", ("comp_after:2",), "started"),
    ("free_late", ("compensated:5",), "started"),
    ("free_late", ("finished:5", "comp_after:4"), "finished"),  # killed in the rollback of the resume
    ("free_late", ("before:3",), "after", ("comp_before:2", "compensated:4")),  # and once settled
]


def _id(plan: str, crashes: tuple[str, ...], wave_wait: str | None, after_settling: tuple[str, ...] = ()) -> str:
    settled = f"-settled+{'+'.join(after_settling)}" if after_settling else ""
    return f"{plan}-{'+'.join(crashes)}-{wave_wait or 'nowait'}{settled}"


def _case(plan: str, crashes: tuple[str, ...], wave_wait: str | None, after_settling: tuple[str, ...] = ()) -> Any:
    return pytest.param(plan, crashes, wave_wait, after_settling, id=_id(plan, crashes, wave_wait, after_settling))


def test_plans_run_in_the_waves_the_cases_assume() -> None:
    for name, plan in PLANS.items():
        assert waves(plan.kinds, plan.executor) == WAVES[name], name


@pytest.mark.parametrize(("plan", "crashes", "wave_wait", "after_settling"), [_case(*case) for case in CASES])
async def test_crash_inside_a_wave_then_resume(
    plan: str, crashes: tuple[str, ...], wave_wait: str | None, after_settling: tuple[str, ...], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths = Paths.under(tmp_path / "harness")
    spec = PLANS[plan]
    history = drive(paths, "parallel-run", spec.kinds, crashes, executor=spec.executor, wave_wait=wave_wait,
                    wave_order=spec.wave_order)
    assert history.children[0].killed, f"crash point {crashes[0]} never fired: {history.children[0].answer}"
    crash_step = int(crashes[0].split(":")[1])
    if crashes[0].split(":")[0] in ("before", "after", "finished"):
        # the crash really came with siblings in flight (when the step has any)
        wave = next(w for w in WAVES[plan] if crash_step in w)
        first = [c for c in read_calls(paths) if c["label"] == "p0" and c["phase"] == "before"]
        started = {int(c["tag"][1:]) for c in first} & set(wave)
        assert started == set(wave), f"at the crash only {sorted(started)} of wave {wave} were in flight"
    state = check_invariants(paths, history)
    settled = 0
    while state.run.status == "in_doubt":
        _, doubts = expected_final(history)
        assert doubts and all(spec.kinds[d - 1] in NEVER_TWICE for d in doubts)
        assert "A human must check whether h_email took effect" in state.run.detail
        await assert_resume_changes_nothing(paths, "parallel-run", monkeypatch.setenv)  # still in doubt
        before = len(history.children)
        history = settle(paths, history, after_settling)
        if after_settling:
            killed = [c.crash for c in history.children[before:] if c.killed]
            assert killed and killed[0] == after_settling[0], f"{after_settling[0]} never fired after settling"
        after_settling = ()
        state = check_invariants(paths, history)
        settled += 1
        assert settled <= len(spec.kinds)
    assert state.run.status == ("failed" if "bounce" in spec.kinds else "succeeded"), state.run.detail
    if state.run.status == "failed":
        undone = list(dict.fromkeys(r.step_id for r in state.steps
                                    if r.kind == "compensation" and r.phase == "intent"))
        refunds = [i for i, k in enumerate(spec.kinds, 1) if k == "refund"]
        assert sorted(undone) == refunds
        if spec.wave_order == "reverse":
            # the wave finished last step first, so it is undone first step first
            assert undone == sorted(undone), (undone, forward_completion_order(state))
        else:
            assert undone == sorted(undone, reverse=True), (undone, forward_completion_order(state))
    await assert_resume_changes_nothing(paths, "parallel-run", monkeypatch.setenv)


def test_matrix_size() -> None:
    assert 20 <= len(CASES) <= 40


# --- the parallel model, without processes ---------------------------------------------------------


def _history(plan: str, crashes: tuple[str, ...], wave_wait: str | None) -> History:
    """A ``History`` whose first process was killed at ``crashes[0]`` and the next ones
    survived (no journal: nothing was done before any of them)."""
    children = [Child(f"p{i}", 0, c, -signal.SIGKILL, "") for i, c in enumerate(crashes)]
    children.append(Child(f"p{len(crashes)}", 0, None, 0, "{}"))
    return History("model-run", PLANS[plan].kinds, children, executor=PLANS[plan].executor, wave_wait=wave_wait)


@pytest.mark.parametrize(("plan", "crash", "wave_wait", "doubts"), [
    ("free2", "after:2", "after", (1, 4)),      # both emails in flight
    ("free2", "after:2", "finished", ()),      # both emails finished before the crash
    ("free2", "finished:1", "before", (4,)),    # the crash step's outcome is journaled; its sibling held
    ("free2", "before:4", "finished", (4,)),    # the crash step itself, as in a sequential run
    ("free", "after:3", "before", (5,)),
    ("waves", "after:7", None, (7,)),           # a wave of one: sequential semantics
    ("waves", "after:2", None, ()),             # lookups alongside lookups: no wave wait needed
    ("free_late", "start:1", None, ()),         # step 1 authorized: nothing started alongside it yet
])
def test_parallel_model(plan: str, crash: str, wave_wait: str | None, doubts: tuple[int, ...]) -> None:
    end = parallel_end(_history(plan, (crash,), wave_wait))
    assert end.doubts == doubts
    assert end.status == ("in_doubt" if doubts else "failed" if "bounce" in PLANS[plan].kinds else "succeeded")


def test_parallel_model_refuses_a_race() -> None:
    """A never-twice sibling of the crash step without a wave wait: finished or not is a race."""
    with pytest.raises(AssertionError, match="is a race"):
        parallel_end(_history("free", ("before:1",), None))
    with pytest.raises(AssertionError, match="is a race"):
        parallel_end(_history("free", ("before:1",), "started"))


def test_parallel_expectations_by_waves() -> None:
    """In doubt at step 4 of one wave (1 settled): 1-3 finished, 5 was in flight (maybe)."""
    kinds = PLANS["free2"].kinds
    assert _parallel_expectations(kinds, WAVES["free2"], "in_doubt", (4,)) == {
        1: "outcome", 2: "outcome", 3: "outcome", 4: "doubt", 5: "maybe"}
    assert _parallel_expectations(kinds, WAVES["free2"], "in_doubt", (1, 4)) == {
        1: "doubt", 2: "maybe", 3: "maybe", 4: "doubt", 5: "maybe"}
    kinds = PLANS["waves"].kinds
    assert _parallel_expectations(kinds, WAVES["waves"], "in_doubt", (7,)) == {
        **dict.fromkeys(range(1, 7), "outcome"), 7: "doubt"}


def test_plans_the_model_does_not_cover_are_refused() -> None:
    with pytest.raises(ValueError, match="larger than max_parallel"):
        waves(PLANS["free"].kinds, {"max_parallel": 4, "order_effects": False})
    with pytest.raises(ValueError, match="bounce to be its last step"):
        waves(("bounce", "lookup"), {})


def test_expected_compensation_order() -> None:
    def record(step: int, kind: str, phase: str, status: str = "succeeded") -> SimpleNamespace:
        return SimpleNamespace(step_id=step, kind=kind, phase=phase, status=status)

    forward = [record(s, "forward", "outcome") for s in (6, 5, 4, 2, 1, 3)]
    state = SimpleNamespace(steps=[record(3, "forward", "outcome", "pending"), *forward])
    assert forward_completion_order(state) == [6, 5, 4, 2, 1, 3]  # 3: when it ran again, not when settled
    assert expected_compensation_order(state, [2, 4, 5]) == [2, 4, 5]
    assert expected_compensation_order(state, [2, 3, 7]) == [7, 3, 2]  # 7 interrupted: first
    assert expected_compensation_order(state, [1, 2, 3]) == [3, 1, 2]
    sequential = SimpleNamespace(steps=[record(s, "forward", "outcome") for s in range(1, 6)])
    assert expected_compensation_order(sequential, [2, 4, 5]) == [5, 4, 2]  # descending step id


# --- the checks can fail ------------------------------------------------------------------------------


def _run(tmp_path: Path, plan: str, crashes: tuple[str, ...], wave_wait: str | None) -> tuple[Paths, History]:
    paths = Paths.under(tmp_path / "harness")
    spec = PLANS[plan]
    history = drive(paths, "check-run", spec.kinds, crashes, executor=spec.executor, wave_wait=wave_wait,
                    wave_order=spec.wave_order)
    check_invariants(paths, history)
    return paths, history


def test_invariants_catch_a_second_email_of_a_sibling_in_doubt(tmp_path: Path) -> None:
    paths, history = _run(tmp_path, "free2", ("after:2",), "after")  # steps 1 and 4 in doubt, both sent
    with sqlite3.connect(paths.shop_db) as conn:
        conn.execute("INSERT INTO emails (email_id, to_addr, subject, body, sent_at) "
                     "VALUES ('E-twice', 'alice@example.com', '[s4] again', 'x', 'now')")
    with pytest.raises(AssertionError, match="step 4"):
        check_invariants(paths, history)


def test_invariants_catch_a_refund_in_flight_undone(tmp_path: Path) -> None:
    paths, history = _run(tmp_path, "free2", ("after:2",), "after")  # step 5 refunded, not journaled
    with sqlite3.connect(paths.shop_db) as conn:
        assert conn.execute("UPDATE refunds SET status = 'cancelled' WHERE idempotency_key = 'check-run:5'").rowcount
    with pytest.raises(AssertionError, match="step 5 was in flight at a crash"):
        check_invariants(paths, history)


def test_invariants_catch_siblings_not_where_the_mode_says(tmp_path: Path) -> None:
    paths, history = _run(tmp_path, "waves", ("before:1",), "before")  # 2 and 3 held before their effect
    history.wave_wait = "after"
    with pytest.raises(AssertionError, match="was not held after its effect"):
        check_invariants(paths, history)


def test_invariants_catch_a_rollback_out_of_completion_order(tmp_path: Path) -> None:
    """The wave finished 6, 5, ..., 1 and was undone 2, 4, 5; a journal saying refund 5 finished
    last (its outcome moved to the end) makes that rollback wrong: 5 should have been first."""
    paths, history = _run(tmp_path, "free_late", ("comp_after:4",), "started")
    with sqlite3.connect(paths.home / "agentkeel.db") as conn:
        (seq,) = conn.execute("SELECT seq FROM steps WHERE run_id = 'check-run' AND step_id = 5 "
                              "AND kind = 'forward' AND phase = 'outcome'").fetchone()
        (last,) = conn.execute("SELECT max(seq) FROM steps").fetchone()
        conn.execute("UPDATE steps SET seq = ? WHERE seq = ?", (last + 1, seq))
    with pytest.raises(AssertionError, match="compensated in order"):
        check_invariants(paths, history)


# --- a resume that stops at a failure journaled beside steps still in flight ---------------------------


def crash_beside_a_bounce(tmp_path: Path, kinds: tuple[str, ...], run_id: str) -> tuple[Paths, Any, Any]:
    """One wave (order_effects = false) killed once the bounce (step 2) has journaled its failure
    while the other steps are past their effect; then one resume. The paths, the resume, the state."""
    paths = Paths.under(tmp_path / "harness")
    paths.write_plan(kinds)
    paths.write_options({"order_effects": False}, wave_wait="after")
    assert run_child(paths, "run", run_id, "p0", "finished:2").killed
    resumed = run_child(paths, "resume", run_id, "p1")
    assert resumed.returncode == 0, resumed.out
    return paths, resumed, load_state(paths, run_id)


def test_a_refund_in_flight_beside_a_journaled_bounce_is_rolled_back(tmp_path: Path) -> None:
    """One wave (order_effects = false): the bounce (step 2) fails and its outcome is journaled while
    the refund (step 3) has made its refund but not journaled it; then the process dies. The resume
    sees the journaled failure and starts nothing; step 3, started and never finished, is reported
    running, and the rollback undoes its refund by the idempotency key (it was once left "skipped")."""
    paths, resumed, state = crash_beside_a_bounce(tmp_path, ("lookup", "bounce", "refund"), "bug-run")
    refunds, _ = read_shop(paths)
    assert [r["status"] for r in refunds if r["idempotency_key"] == "bug-run:3"] == ["cancelled"], refunds
    assert state.run.status == "failed", state.run.detail
    assert resumed.answer["steps"]["3"] == "compensated", resumed.answer


def test_an_email_in_flight_beside_a_journaled_bounce_leaves_the_run_in_doubt(tmp_path: Path) -> None:
    """The same with an email (never twice) in flight: its effect is unknown, so the resume stops the
    run ``in_doubt`` naming it, and compensates nothing until a human has said what happened."""
    paths, _, state = crash_beside_a_bounce(tmp_path, ("refund", "bounce", "email"), "doubt-run")
    assert state.run.status == "in_doubt", state.run.detail
    assert "step 3 (h_email)" in state.run.detail
    refunds, emails = read_shop(paths)
    assert [r["status"] for r in refunds] == ["issued"]  # nothing undone before the human decides
    assert len([e for e in emails if e["subject"].startswith("[s3] ")]) == 1
