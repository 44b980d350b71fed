"""The crash harness of issue 4: a 10-step plan killed at every step boundary and mid-step.

Each case runs the plan in a child process that SIGKILLs itself at one point
(see ``tests.durable.harness``), resumes the run in further child processes
until one survives, checks every invariant against the journal, the shop
database and the call log, and finally resumes once more in this process to
show a finished (or in-doubt) run is left alone.

Plans: ``ok`` mixes idempotent lookups, key-taking refunds and never-twice
emails; ``late_fail`` is the same with a last email that bounces, so the run
aborts and its refunds are compensated (crash points inside the rollback too).
The ``random-*`` cases chain up to three crashes (seeded).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from agentkeel.types import RunStatus

from tests.durable.harness import (
    CALL_LOG_ENV,
    LABEL_ENV,
    NEVER_TWICE,
    Paths,
    build_system,
    check_invariants,
    drive,
    expected_end,
    load_state,
    read_calls,
    read_shop,
)

PLAN_OK = ("lookup", "refund", "email", "lookup", "refund", "email", "refund", "lookup", "email", "refund")
PLAN_LATE_FAIL = (*PLAN_OK[:9], "bounce")
PLANS = {"ok": PLAN_OK, "late_fail": PLAN_LATE_FAIL}
RANDOM_CASES = 16
RANDOM_SEED = 20240604


def crash_points(kinds: tuple[str, ...]) -> list[str]:
    """Every step boundary, both sides of every effect, and every point of the rollback."""
    points = ["start:1"]
    for step in range(1, len(kinds) + 1):
        points += [f"before:{step}", f"after:{step}", f"finished:{step}"]
    if "bounce" in kinds:
        for step, kind in enumerate(kinds, start=1):
            if kind == "refund":
                points += [f"comp_before:{step}", f"comp_after:{step}", f"compensated:{step}"]
    return points


def _matrix() -> list[pytest.param]:
    cases = [pytest.param(name, (point,), id=f"{name}-{point}") for name in PLANS for point in crash_points(PLANS[name])]
    rng = random.Random(RANDOM_SEED)
    for i in range(RANDOM_CASES):
        name = rng.choice(sorted(PLANS))
        chain = tuple(rng.sample(crash_points(PLANS[name]), rng.randint(2, 3)))
        cases.append(pytest.param(name, chain, id=f"random{i}-{name}-{'+'.join(chain)}"))
    return cases


def _paths(tmp_path: Path, home: Path) -> Paths:
    return Paths.under(tmp_path / "harness", home=home, shop_db=Path(os.environ["AGENTKEEL_SHOP_DB"]))


async def assert_resume_changes_nothing(paths: Paths, run_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resuming a finished or in-doubt run again runs nothing and writes no step."""
    monkeypatch.setenv(CALL_LOG_ENV, str(paths.call_log))
    monkeypatch.setenv(LABEL_ENV, "in-process")
    calls, shop, state = read_calls(paths), read_shop(paths), load_state(paths, run_id)
    async with build_system() as system:
        response = await system.resume(run_id)
        shown = system.show(run_id)
    assert response.status.value == state.run.status == shown.status.value
    assert read_calls(paths) == calls
    assert read_shop(paths) == shop
    assert load_state(paths, run_id).steps == state.steps
    if state.run.status == RunStatus.FAILED.value:
        refunds = [s for s in shown.steps if s.tool_name == "h_refund"]
        assert refunds and all(s.status.value == "compensated" for s in refunds), shown.steps


@pytest.mark.parametrize(("plan", "crashes"), _matrix())
async def test_crash_then_resume(
    plan: str, crashes: tuple[str, ...], tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _paths(tmp_path, isolated_home)
    kinds = PLANS[plan]
    history = drive(paths, "harness-run", kinds, crashes)
    assert history.children[0].killed, f"crash point {crashes[0]} never fired: {history.children[0].answer}"
    state = check_invariants(paths, history)
    if state.run.status == "in_doubt":
        _, step = expected_end(kinds, history.triggered)
        assert step is not None and kinds[step - 1] in NEVER_TWICE
        assert "A human must check whether h_email took effect" in state.run.detail
    await assert_resume_changes_nothing(paths, "harness-run", monkeypatch)


def test_matrix_is_at_least_fifty_crashing_runs() -> None:
    """The issue asks for at least 50 runs killed at chosen and random points."""
    assert len(_matrix()) >= 50 + RANDOM_CASES
