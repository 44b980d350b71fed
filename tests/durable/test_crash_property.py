"""Property: for any plan shape and any crash points, resume keeps every promise of issue 4.

Plans of 3 to 8 steps mix idempotent lookups, key-taking refunds and never-twice
emails, sometimes ending in an email that bounces (a late failure, so the run
is rolled back); one to three crash points are drawn from every step boundary,
both sides of every effect and every point of the rollback. A run left in doubt
is settled as an operator would (``resume --resolve``), possibly crashing again
after that, and checked once more. Each example runs
in fresh state with real child processes (``tests.durable.harness``).
Derandomized, so CI sees the same examples every time.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.durable.harness import (
    Paths,
    assert_resume_changes_nothing,
    check_invariants,
    crash_points,
    drive,
    settle,
)

_ids = itertools.count()


Scenario = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    """(plan kinds, crash points of the run and its resumes, crash points after an operator settles)."""
    kinds = draw(st.lists(st.sampled_from(("lookup", "refund", "email")), min_size=3, max_size=8))
    if draw(st.booleans()):
        kinds[-1] = "bounce"
    points = st.sampled_from(crash_points(kinds))
    chain = draw(st.lists(points, min_size=1, max_size=3))
    after_settling = draw(st.lists(points, max_size=2))
    return tuple(kinds), tuple(chain), tuple(after_settling)


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_any_plan_any_crash_points(scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> None:
    kinds, chain, after_settling = scenario
    paths = Paths.under(tmp_path_factory.mktemp("property"))
    run_id = f"property-{next(_ids)}"
    history = drive(paths, run_id, kinds, chain)
    state = check_invariants(paths, history)
    event(f"run {state.run.status}")
    while state.run.status == "in_doubt":  # an operator settles it; more crashes may follow
        history = settle(paths, history, after_settling)
        after_settling = ()
        state = check_invariants(paths, history)
        event(f"settled, then {state.run.status}")
    event(f"{len(history.triggered)} crash(es) fired")
    with pytest.MonkeyPatch.context() as mp:
        asyncio.run(assert_resume_changes_nothing(paths, run_id, mp.setenv))
