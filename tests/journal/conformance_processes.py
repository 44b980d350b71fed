"""The multi-process half of the journal conformance suite (see ``conformance``)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from agentkeel.errors import (
    FencedError,
    LeaseHeldError,
    RunNotFoundError,
)
from agentkeel.journal.base import Journal, make_owner

from tests.journal.helpers import (
    ALICE,
    BOB,
    FakeClock,
    MakeJournal,
    intent,
    new_run,
    outcome,
)

# --- code run in child processes (module level, so spawn can import it) ----------------------


def _child_acquire_rounds(
    factory: Callable[[], Journal], run_ids: list[str], barrier: Any, results: Any
) -> None:
    journal = factory()
    owner = make_owner()
    try:
        for run_id in run_ids:
            barrier.wait(timeout=30)
            try:
                lease = journal.acquire(run_id, owner, ttl_s=300.0)
                results.put(("won", run_id, owner, lease.epoch))
            except LeaseHeldError as exc:
                results.put(("held", run_id, owner, exc.holder))
            except Exception as exc:  # noqa: BLE001 - reported, so the test fails fast with the cause
                results.put(("error", run_id, owner, repr(exc)))
    finally:
        journal.close()


def _child_write_until_fenced(factory: Callable[[], Journal], run_id: str, results: Any) -> None:
    journal = factory()
    lease = new_run(journal, run_id, owner=make_owner(), ttl_s=0)  # expired: anyone may take it
    written = 0
    try:
        for step_id in itertools.count(1):
            journal.intent(lease, intent(step_id))
            written += 1
            if step_id > 100_000:
                raise AssertionError("never fenced")
    except FencedError:
        results.put(("fenced", written))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))
    finally:
        journal.close()


def _child_intent_then_die(factory: Callable[[], Journal], run_id: str) -> None:
    journal = factory()
    lease = new_run(journal, run_id, owner=make_owner())
    journal.intent(lease, intent(1, idempotency_key=f"{run_id}:1"))
    os.kill(os.getpid(), signal.SIGKILL)


class ProcessConformance:
    """Tests that need several handles or processes on one journal; skipped when
    the backend's ``child_factory`` fixture is None."""

    # --- several handles and processes ---------------------------------------------------

    def test_a_second_handle_is_fenced_and_sees_every_write(
        self, make_journal: MakeJournal, child_factory: Callable[[], Journal] | None
    ) -> None:
        if child_factory is None:
            pytest.skip("this backend is not shared between handles")
        clock = FakeClock()
        mine, theirs = make_journal(clock=clock), make_journal(clock=clock)
        stale = new_run(mine, ttl_s=5)
        mine.intent(stale, intent(1))
        assert theirs.load("run-1").forward(1)[0] is not None  # committed on return
        with pytest.raises(LeaseHeldError):
            theirs.acquire("run-1", BOB)
        clock.advance(6)
        fresh = theirs.acquire("run-1", BOB)
        with pytest.raises(FencedError):
            mine.outcome(stale, outcome(1))
        theirs.outcome(fresh, outcome(1))
        assert mine.load("run-1").forward(1)[1] is not None

    def test_concurrent_acquire_from_two_processes_has_one_winner(
        self, make_journal: MakeJournal, child_factory: Callable[[], Journal] | None
    ) -> None:
        if child_factory is None:
            pytest.skip("this backend is not shared between processes")
        journal = make_journal()
        run_ids = [f"race-{i}" for i in range(12)]
        for run_id in run_ids:
            new_run(journal, run_id, owner=ALICE, ttl_s=0)  # expired at once: up for grabs
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [
            ctx.Process(
                target=_child_acquire_rounds, args=(child_factory, run_ids, barrier, results)
            )
            for _ in range(2)
        ]
        for p in procs:
            p.start()
        outcomes: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + 60
        while len(outcomes) < 2 * len(run_ids) and time.monotonic() < deadline:
            try:
                outcomes.append(results.get(timeout=0.5))
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert not [o for o in outcomes if o[0] == "error"], outcomes
        for run_id in run_ids:
            mine = [o for o in outcomes if o[1] == run_id]
            won = [o for o in mine if o[0] == "won"]
            held = [o for o in mine if o[0] == "held"]
            assert len(won) == 1 and len(held) == 1, mine
            assert won[0][3] == 2 and held[0][3] == won[0][2]  # refused, naming the winner
            assert journal.load(run_id).run.owner == won[0][2]

    def test_a_writer_in_another_process_is_fenced_mid_stream(
        self, make_journal: MakeJournal, child_factory: Callable[[], Journal] | None
    ) -> None:
        if child_factory is None:
            pytest.skip("this backend is not shared between processes")
        journal = make_journal()
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        proc = ctx.Process(target=_child_write_until_fenced, args=(child_factory, "hot", results))
        proc.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # let it write a while, then take the run away
            try:
                if len(journal.load("hot").steps) >= 20:
                    break
            except RunNotFoundError:
                pass
            time.sleep(0.005)
        lease = journal.acquire("hot", BOB)
        journal.intent(lease, intent(0))
        verdict = results.get(timeout=60)
        proc.join(timeout=30)
        assert verdict[0] == "fenced", verdict
        steps = journal.load("hot").steps
        theirs = [r for r in steps if r.step_id != 0]
        # every write the child saw succeed is there, none it saw refused, and none after ours
        assert len(theirs) == verdict[1] >= 20
        assert [r.step_id for r in theirs] == list(range(1, verdict[1] + 1))
        assert steps[-1].step_id == 0

    def test_an_intent_survives_the_writer_being_killed(
        self, make_journal: MakeJournal, child_factory: Callable[[], Journal] | None
    ) -> None:
        if child_factory is None:
            pytest.skip("this backend does not outlive its process")
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_child_intent_then_die, args=(child_factory, "killed"))
        proc.start()
        proc.join(timeout=60)
        assert proc.exitcode == -signal.SIGKILL
        journal = make_journal()
        state = journal.load("killed")
        started, finished = state.forward(1)
        assert started is not None and finished is None
        assert started.idempotency_key == "killed:1"
        lease = journal.acquire("killed", BOB)  # the dead writer does not block a resume
        assert lease.epoch == 2
