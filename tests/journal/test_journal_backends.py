"""The journal conformance suite, run against every backend, plus backend-specific checks."""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentkeel.errors import ConfigError, RunNotFoundError, StoreError
from agentkeel.journal.base import Journal, PlanRecord, StepRecord
from agentkeel.journal.memory import MemoryJournal
from agentkeel.journal.sqlite import SQLiteJournal
from agentkeel.stores import MIGRATIONS, db_path, open_db, schema_version

from tests.journal.conformance import JournalConformance
from tests.journal.helpers import ALICE, FakeClock, a_plan, another_plan, ask, intent, new_run, outcome


class TestMemoryJournal(JournalConformance):
    @pytest.fixture
    def make_journal(self) -> Iterator[Callable[..., Journal]]:
        opened: list[MemoryJournal] = []

        def make(clock: Callable[[], float] = time.time) -> Journal:
            opened.append(MemoryJournal(clock=clock))
            return opened[-1]

        yield make
        for journal in opened:
            journal.close()

    @pytest.fixture
    def child_factory(self) -> None:
        return None


class TestSQLiteJournal(JournalConformance):
    @pytest.fixture(params=["NORMAL", "FULL"])
    def synchronous(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def make_journal(self, tmp_path: Path, synchronous: str) -> Iterator[Callable[..., Journal]]:
        opened: list[SQLiteJournal] = []

        def make(clock: Callable[[], float] = time.time) -> Journal:
            opened.append(SQLiteJournal(tmp_path / "home", clock=clock, synchronous=synchronous))
            return opened[-1]

        yield make
        for journal in opened:
            journal.close()

    @pytest.fixture
    def child_factory(self, tmp_path: Path) -> Callable[[], Journal]:
        return functools.partial(SQLiteJournal, tmp_path / "home")


# --- SQLite only ------------------------------------------------------------------------


def test_journal_shares_the_store_file_and_its_schema(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path)
    try:
        lease = new_run(journal)
        journal.intent(lease, intent(1))
    finally:
        journal.close()
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "steps", "memory_turns"} <= tables
        assert conn.execute("SELECT count(*) FROM steps").fetchone() == (1,)
        assert {"plan_revisions", "approvals"} <= tables
        # revision 1 is stored by create_run (load reads it as revision 1 only for older runs)
        assert conn.execute("SELECT run_id, revision, reason FROM plan_revisions").fetchall() == [
            ("run-1", 1, "initial")
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_synchronous_mode_is_applied_and_checked(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path, synchronous="full")
    try:
        assert journal.synchronous == "FULL"
        conn = journal._db._connection()  # checking the pragma took effect
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        journal.close()
    with pytest.raises(ConfigError, match="synchronous"):
        SQLiteJournal(tmp_path, synchronous="OFF")


def test_closed_journal_refuses_use(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path)
    journal.close()
    journal.close()
    with pytest.raises(StoreError, match="closed"):
        journal.list_runs()


def test_unusable_file_is_a_store_error(tmp_path: Path) -> None:
    db_path(tmp_path).write_bytes(b"this is not a database" * 100)
    with pytest.raises((StoreError, sqlite3.DatabaseError)):
        SQLiteJournal(tmp_path)


def test_a_locked_database_is_reported_as_a_store_error(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path, busy_timeout_s=0.05)
    lease = new_run(journal)
    blocker = open_db(tmp_path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked"):
            journal.intent(lease, intent(1))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    journal.intent(lease, StepRecord(1, "forward", "intent", "shop:t1", {}))
    assert len(journal.load("run-1").steps) == 1
    assert journal.load("run-1").run.owner == ALICE
    journal.close()


def test_migration_3_adds_the_planning_cost_and_then_status_to_existing_runs(tmp_path: Path) -> None:
    """A file written before migration 3 opens with its runs intact and the new fields defaulted."""
    assert [m.version for m in MIGRATIONS[:3]] == [1, 2, 3]
    old = open_db(tmp_path, migrations=MIGRATIONS[:2])
    try:
        assert schema_version(old) == 2
        old.execute(
            "INSERT INTO runs (run_id, user_id, session_id, message, principal, budget_usd, plan, status, "
            "detail, created_at, updated_at, owner, epoch, lease_expires_at) "
            "VALUES ('old-run', 'u', 's', 'm', 'p', 1.5, '{}', 'rolling_back', 'aborting', 1.0, 2.0, '', 3, 0)"
        )
    finally:
        old.close()
    journal = SQLiteJournal(tmp_path)
    try:
        run = journal.load("old-run").run
        assert (run.status, run.detail, run.epoch, run.budget_usd) == ("rolling_back", "aborting", 3, 1.5)
        assert (run.planning_cost_usd, run.then_status) == (0.0, "")
        lease = journal.acquire("old-run", ALICE)
        journal.set_status(lease, "rolling_back", "resumed", then_status="failed")
        assert journal.load("old-run").run.then_status == "failed"
    finally:
        journal.close()
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        assert {"planning_cost_usd", "then_status"} <= columns
    finally:
        conn.close()


def test_migration_4_reads_an_existing_runs_plan_as_revision_1(tmp_path: Path) -> None:
    """A file written before migration 4 opens with its runs intact: no answer yet, and the
    plan as revision 1, which a first revise_plan stores before revision 2."""
    assert [m.version for m in MIGRATIONS[:4]] == [1, 2, 3, 4]
    assert MIGRATIONS[3].component == "journal"
    old = open_db(tmp_path, migrations=MIGRATIONS[:3])
    try:
        assert schema_version(old) == 3
        old.execute(
            "INSERT INTO runs (run_id, user_id, session_id, message, principal, budget_usd, plan, status, "
            "detail, created_at, updated_at, owner, epoch, lease_expires_at, planning_cost_usd, then_status) "
            "VALUES ('old-run', 'u', 's', 'm', 'p', 1.5, ?, 'running', '', 1.0, 2.0, '', 3, 0, 0.2, 'replan')",
            (json.dumps(a_plan()),),
        )
    finally:
        old.close()
    clock = FakeClock()
    journal = SQLiteJournal(tmp_path, clock=clock)
    try:
        state = journal.load("old-run")
        assert (state.run.status, state.run.epoch, state.run.then_status) == ("running", 3, "replan")
        assert state.run.answer == ""
        initial = PlanRecord(1, "initial", a_plan(), 0.2, 1.0)
        assert state.revisions == (initial,)
        assert journal.list_runs()[0].answer == ""
        lease = journal.acquire("old-run", ALICE)
        assert journal.revise_plan(lease, another_plan(), "replan", 0.05) == 2
        state = journal.load("old-run")
        assert state.revisions == (initial, PlanRecord(2, "replan", another_plan(), 0.05, clock.now))
        assert (state.run.plan, state.run.planning_cost_usd, state.run.then_status) == (another_plan(), 0.25, "")
        journal.set_status(lease, "succeeded", answer="done ✓")
        assert journal.load("old-run").run.answer == "done ✓"
        ask(journal, lease, 1)
        assert [a.step_id for a in journal.list_approvals()] == [1]
    finally:
        journal.close()
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        assert "answer" in {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'index')")}
        assert {"plan_revisions", "approvals", "approvals_by_status"} <= names
        assert conn.execute("SELECT revision, reason FROM plan_revisions ORDER BY revision").fetchall() == [
            (1, "initial"),
            (2, "replan"),
        ]
        with pytest.raises(sqlite3.IntegrityError):  # the status is checked by the schema too
            conn.execute("UPDATE approvals SET status = 'maybe'")
    finally:
        conn.close()


def test_step_writes_stay_one_statement(tmp_path: Path) -> None:
    """The per-step hot path: intent and outcome are one INSERT each, whatever else the journal holds."""
    journal = SQLiteJournal(tmp_path)
    try:
        lease = new_run(journal)
        journal.revise_plan(lease, another_plan(), "replan")
        ask(journal, lease, 1)
        statements: list[str] = []
        journal._db._connection().set_trace_callback(statements.append)  # watching what the hot path runs
        journal.intent(lease, intent(1))
        journal.outcome(lease, outcome(1))
        journal._db._connection().set_trace_callback(None)
        assert len(statements) == 2, statements
        assert all(s.startswith("INSERT INTO steps") for s in statements), statements
    finally:
        journal.close()


def test_a_failed_create_run_leaves_no_revision(tmp_path: Path) -> None:
    """create_run writes the run and its revision 1 in one transaction: both or neither."""
    conn = open_db(tmp_path)
    try:  # a stray revision row for a run id not yet created makes the second insert fail
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("INSERT INTO plan_revisions VALUES ('run-1', 1, 'initial', '{}', 0, 0)")
    finally:
        conn.close()
    journal = SQLiteJournal(tmp_path)
    try:
        with pytest.raises(StoreError, match="create_run"):
            new_run(journal)
        with pytest.raises(RunNotFoundError):
            journal.load("run-1")
    finally:
        journal.close()
