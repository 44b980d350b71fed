"""The journal conformance suite on PostgreSQL (real server, real separate processes), plus
PostgreSQL-specific checks: the schema, the default hook, a served run end to end."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from agentkeel import pg
from agentkeel.config import Config
from agentkeel.errors import FencedError, JournalRecordError, LeaseHeldError, RunNotFoundError, StoreError
from agentkeel.journal.base import Journal, StepRecord
from agentkeel.journal.pg import PostgresJournal

from tests.journal.conformance import JournalConformance
from tests.journal.helpers import ALICE, BOB, FakeClock, ask, intent, new_run, outcome


class TestPostgresJournal(JournalConformance):
    @pytest.fixture
    def make_journal(self, pg_url: str) -> Iterator[Callable[..., Journal]]:
        opened: list[PostgresJournal] = []

        def make(clock: Callable[[], float] = time.time) -> Journal:
            opened.append(PostgresJournal(pg_url, clock=clock))
            return opened[-1]

        yield make
        for journal in opened:
            journal.close()

    @pytest.fixture
    def child_factory(self, pg_url: str) -> Callable[[], Journal]:
        return functools.partial(PostgresJournal, pg_url)


# --- PostgreSQL only --------------------------------------------------------------------


def test_the_schema_is_migrated_and_holds_the_journal(pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    try:
        lease = new_run(journal)
        journal.intent(lease, intent(1))
        ask(journal, lease, 2)
    finally:
        journal.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT version, component FROM agentkeel_schema ORDER BY version").fetchall()
        assert [r[0] for r in rows] == list(range(1, len(pg.PG_MIGRATIONS) + 1))
        assert rows[0] == (1, "journal")
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        assert {"runs", "steps", "plan_revisions", "approvals"} <= tables
        assert conn.execute("SELECT count(*) FROM steps").fetchone() == (1,)
        assert conn.execute("SELECT run_id, revision, reason FROM plan_revisions").fetchall() == [
            ("run-1", 1, "initial")
        ]
        with pytest.raises(psycopg.errors.CheckViolation):  # the status is checked by the schema too
            conn.execute("UPDATE approvals SET status = 'maybe'")


def test_two_threads_racing_acquire_have_one_winner(pg_url: str) -> None:
    """Two journals (two pooled connections) in two threads, many rounds: one winner each."""
    setup = PostgresJournal(pg_url)
    run_ids = [f"race-{i}" for i in range(20)]
    for run_id in run_ids:
        new_run(setup, run_id, ttl_s=0)  # expired at once: up for grabs
    handles = [PostgresJournal(pg_url), PostgresJournal(pg_url)]
    barrier = threading.Barrier(2)
    results: list[tuple[str, str, object]] = []
    lock = threading.Lock()

    def race(n: int) -> None:
        owner = f"host-{n}.invalid:{n}:1"
        for run_id in run_ids:
            barrier.wait(timeout=30)
            try:
                outcome_: object = handles[n].acquire(run_id, owner, ttl_s=300)
            except LeaseHeldError as exc:
                outcome_ = exc
            except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
                outcome_ = RuntimeError(repr(exc))
            with lock:
                results.append((run_id, owner, outcome_))

    threads = [threading.Thread(target=race, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert len(results) == 2 * len(run_ids)
        for run_id in run_ids:
            mine = [(owner, out) for r, owner, out in results if r == run_id]
            won = [(owner, out) for owner, out in mine if not isinstance(out, Exception)]
            held = [out for _, out in mine if isinstance(out, LeaseHeldError)]
            assert len(won) == 1 and len(held) == 1, mine
            assert held[0].holder == won[0][0]  # refused, naming the winner
            assert setup.load(run_id).run.owner == won[0][0]
            assert setup.load(run_id).run.epoch == 2
    finally:
        for journal in (setup, *handles):
            journal.close()


def test_a_stale_writer_racing_a_takeover_is_fenced(pg_url: str) -> None:
    """Steps written from one thread while another takes the run over: none after the takeover."""
    writer_journal, taker = PostgresJournal(pg_url), PostgresJournal(pg_url)
    lease = new_run(writer_journal, "hot", ttl_s=0)
    written: list[int] = []
    fenced_at: list[FencedError] = []

    def write() -> None:
        for step_id in range(1, 100_000):
            try:
                writer_journal.intent(lease, intent(step_id))
            except FencedError as exc:
                fenced_at.append(exc)
                return
            written.append(step_id)

    thread = threading.Thread(target=write)
    thread.start()
    deadline = time.monotonic() + 30
    while len(written) < 20 and time.monotonic() < deadline:
        time.sleep(0.005)
    fresh = taker.acquire("hot", BOB)
    taker.intent(fresh, intent(0))
    thread.join(timeout=60)
    try:
        assert fenced_at and fenced_at[0].holder == BOB
        steps = taker.load("hot").steps
        assert [r.step_id for r in steps[:-1]] == written
        assert steps[-1].step_id == 0
    finally:
        writer_journal.close()
        taker.close()


def test_the_default_hook_opens_the_postgres_journal(pg_url: str) -> None:
    from agentkeel.journal.default import agentkeel_open_journal

    journal = agentkeel_open_journal(Config.from_dict({"store": {"url": pg_url}, "principals": {}}))
    try:
        assert isinstance(journal, PostgresJournal)
        new_run(journal)
        other = PostgresJournal(pg_url)  # what one replica writes, another sees
        assert other.load("run-1").run.owner == ALICE
        other.close()
    finally:
        journal.close()


def test_closed_journal_refuses_use(pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    other = PostgresJournal(pg_url)
    journal.close()
    journal.close()
    with pytest.raises(StoreError, match="closed"):
        journal.list_runs()
    assert other.list_runs() == []  # the shared pool is not closed with one handle
    other.close()


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    from agentkeel.testing.services import free_port

    url = f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError) as info:
        PostgresJournal(url)
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)


def test_nul_characters_are_refused_in_text_and_kept_in_json(pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    try:
        with pytest.raises(JournalRecordError, match="message"):
            new_run(journal, message="nul \x00 here")
        with pytest.raises(RunNotFoundError):
            journal.load("run-1")
        lease = new_run(journal, plan={"steps": [], "note": "a\x00b"})
        assert journal.load("run-1").run.plan == {"steps": [], "note": "a\x00b"}
        with pytest.raises(JournalRecordError, match="error"):
            journal.outcome(lease, outcome(1, status="failed", error="boom\x00"))
        journal.outcome(lease, outcome(1, result={"raw": "\x00"}))
        assert journal.load("run-1").steps[0].result == {"raw": "\x00"}
        with pytest.raises(JournalRecordError, match="detail"):
            journal.set_status(lease, "failed", "bad\x00")
        with pytest.raises(RunNotFoundError):
            journal.load("run\x00-1")
        assert journal.approval("run\x00-1", 1) is None
        assert journal.list_runs(user_id="u\x00") == []
        assert [s.step_id for s in journal.load("run-1").steps] == [1]
    finally:
        journal.close()


def test_a_failed_statement_is_a_store_error_naming_the_call(pg_url: str) -> None:
    """A write the database refuses for its own reasons rolls back whole and says what failed."""
    journal = PostgresJournal(pg_url, clock=FakeClock())
    try:
        with psycopg.connect(pg_url) as conn:  # a stray revision row makes create_run's second insert fail
            conn.execute("ALTER TABLE plan_revisions DROP CONSTRAINT plan_revisions_run_id_fkey")
            conn.execute("INSERT INTO plan_revisions VALUES ('run-1', 1, 'initial', '{}', 0, 0)")
        with pytest.raises(StoreError, match="create_run"):
            new_run(journal)
        with pytest.raises(RunNotFoundError):
            journal.load("run-1")
    finally:
        journal.close()


def test_step_ids_and_times_keep_their_types(pg_url: str) -> None:
    journal = PostgresJournal(pg_url)
    try:
        lease = new_run(journal, budget_usd=1)
        big = 2**40
        journal.intent(lease, StepRecord(big, "forward", "intent", "shop:t", {}, attempts=big, ts=0.1 + 0.2))
        (step,) = journal.load("run-1").steps
        assert (step.step_id, step.attempts, step.ts) == (big, big, 0.1 + 0.2)
        assert type(step.step_id) is int and type(step.ts) is float
        run = journal.load("run-1").run
        assert run.budget_usd == 1.0 and type(run.budget_usd) is float and type(run.epoch) is int
    finally:
        journal.close()


# --- end to end ------------------------------------------------------------------------


def test_a_served_run_is_journaled_in_postgres_and_resumable(pg_url: str) -> None:
    pytest.importorskip("agentkeel_support")
    from agentkeel.runtime.system import AgentSystem
    from agentkeel.types import AgentRequest

    config: dict[str, Any] = {"store": {"url": pg_url}, "principals": {"demo": {"permissions": ["read", "refunds"]}}}
    with AgentSystem(Config.from_dict(config)) as system:
        assert isinstance(system.journal, PostgresJournal)
        response = system.run_sync(AgentRequest(message="where is order 1003", user_id="demo"))
        assert response.ok, response
        run_id = response.run_id
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT user_id, status, owner FROM runs WHERE run_id = %s", (run_id,)).fetchone()
        assert row == ("demo", response.status.value, "")  # released when it ended
        steps = conn.execute("SELECT count(*) FROM steps WHERE run_id = %s", (run_id,)).fetchone()
        assert steps is not None and steps[0] >= 2  # an intent and an outcome at least
    with AgentSystem(Config.from_dict(config)) as again:  # another system (a replica) on the same database
        shown = again.show(run_id)
        assert (shown.run_id, shown.status) == (run_id, response.status)
        resumed = again.resume_sync(run_id)  # finished: shown as it is, nothing re-run
        assert (resumed.run_id, resumed.status) == (run_id, response.status)
        assert [r.run_id for r in again.runs()] == [run_id]
    journal = PostgresJournal(pg_url)
    try:
        assert len(journal.load(run_id).steps) == steps[0]  # the resume wrote no step
    finally:
        journal.close()
