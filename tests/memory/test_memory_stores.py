"""The memory store conformance suite against every backend, and what only SQLite promises."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentkeel.memory.memory_store import InProcessMemoryStore
from agentkeel.memory.sqlite_store import SQLiteMemoryStore
from agentkeel.memory.store import MemoryStore
from agentkeel.stores import DB_FILENAME

from tests.memory.conformance import MemoryStoreConformance


class TestInProcess(MemoryStoreConformance):
    @pytest.fixture
    def store(self) -> Iterator[MemoryStore]:
        store = InProcessMemoryStore()
        yield store
        store.close()


class TestSQLite(MemoryStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[MemoryStore]:
        store = SQLiteMemoryStore(tmp_path)
        opened = [store]
        self.reopen = lambda: opened.append(SQLiteMemoryStore(tmp_path)) or opened[-1]  # type: ignore[func-returns-value]
        yield store
        for s in opened:
            s.close()


def test_sqlite_forget_really_deletes_rows_and_index_entries(tmp_path: Path) -> None:
    store = SQLiteMemoryStore(tmp_path)
    store.save_exchange("ann", "s1", "r1", "my passport is ZX123456", "ok", record="passport ZX123456")
    store.save_exchange("bob", "s1", "r2", "bob", "ok", record="bob ZX123456")
    store.forget("ann")
    store.vacuum()
    store.close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as db:
        assert db.execute("SELECT count(*) FROM memory_turns WHERE content LIKE '%ZX123456%'").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM memory_records WHERE user_id = 'ann'").fetchone() == (0,)
        # only bob's row is still in the full-text index
        assert db.execute("SELECT count(*) FROM memory_records_fts WHERE memory_records_fts MATCH "
                          "'\"ZX123456\"'").fetchone() == (1,)
    assert b"passport" not in (tmp_path / DB_FILENAME).read_bytes()
