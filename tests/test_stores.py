"""The shared SQLite store helper: migrations, WAL, the per-path connection cache."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from agentkeel.errors import StoreError
from agentkeel.stores import MIGRATIONS, ConnectionCache, Migration, open_db, schema_version


def test_open_db_uses_wal_and_migrates_once(tmp_path: Path) -> None:
    first = open_db(tmp_path / "h")
    second = open_db(tmp_path / "h")
    try:
        assert first.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert first.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        assert schema_version(first) == schema_version(second) == len(MIGRATIONS)
        tables = {
            r[0] for r in second.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        assert "memory_turns" in tables
    finally:
        first.close()
        second.close()


def test_later_migrations_apply_to_an_existing_file(tmp_path: Path) -> None:
    open_db(tmp_path).close()
    extra = (
        *MIGRATIONS,
        Migration(len(MIGRATIONS) + 1, "journal", ("CREATE TABLE journal_x (k TEXT)",)),
    )

    conn = open_db(tmp_path, migrations=extra)
    try:
        assert schema_version(conn) == len(extra)
        conn.execute("INSERT INTO journal_x VALUES ('ok')")
    finally:
        conn.close()

    with pytest.raises(StoreError, match="newer than this agentkeel knows"):
        open_db(tmp_path)


def test_a_failing_migration_leaves_the_version_unchanged(tmp_path: Path) -> None:
    broken = (
        *MIGRATIONS,
        Migration(len(MIGRATIONS) + 1, "bad", ("CREATE TABLE ok_t (x)", "NOT SQL")),
    )
    with pytest.raises(sqlite3.OperationalError):
        open_db(tmp_path, migrations=broken)
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'ok_t'").fetchone() is None
    finally:
        conn.close()


def test_migration_versions_must_be_contiguous(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no gaps"):
        open_db(tmp_path, migrations=(Migration(2, "x", ()),))


def test_connection_cache_keys_by_path(tmp_path: Path) -> None:
    cache = ConnectionCache()
    try:
        a = cache.get(tmp_path / "a")
        assert cache.get(tmp_path / "a" / ".." / "a") is a
        assert cache.get(tmp_path / "b") is not a
        cache.discard(tmp_path / "a")
        assert cache.get(tmp_path / "a") is not a
    finally:
        cache.close_all()
