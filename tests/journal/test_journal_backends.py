"""The journal conformance suite, run against every backend, plus backend-specific checks."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentkeel.errors import ConfigError, StoreError
from agentkeel.journal.base import Journal, StepRecord
from agentkeel.journal.memory import MemoryJournal
from agentkeel.journal.sqlite import SQLiteJournal
from agentkeel.stores import MIGRATIONS, db_path, open_db, schema_version

from tests.journal.conformance import JournalConformance
from tests.journal.helpers import ALICE, intent, new_run


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
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_synchronous_mode_is_applied_and_checked(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path, synchronous="full")
    try:
        assert journal.synchronous == "FULL"
        conn = journal._connection()  # checking the pragma took effect
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
