"""The SQLite memory manager and the shared store helper, against real SQLite files."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest
from agentkeel import hookspecs
from agentkeel.config import Config
from agentkeel.memory import sqlite as memory_sqlite
from agentkeel.errors import ConfigError
from agentkeel.markers import PROJECT_NAME
from agentkeel.plugin.manager import Plugins
from agentkeel.stores import (
    DB_FILENAME,
    MIGRATIONS,
    ConnectionCache,
    Migration,
    StoreError,
    open_db,
    schema_version,
)
from agentkeel.types import AgentRequest, AgentResponse, MemoryContext, RunStatus


@pytest.fixture(autouse=True)
def _fresh_connections() -> Iterator[None]:
    memory_sqlite.close_connections()
    yield
    memory_sqlite.close_connections()


@pytest.fixture
def plugins() -> Plugins:
    """A plugin manager holding only the memory plugin, checked against the hookspecs."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(memory_sqlite, name="memory_sqlite")
    pm.check_pending()
    return Plugins(pm)


def make_config(
    home: Path,
    memory: Mapping[str, Any] | None = None,
    monkeypatch: pytest.MonkeyPatch | None = None,
) -> Config:
    if monkeypatch is not None:
        monkeypatch.delenv("AGENTKEEL_HOME", raising=False)
    data: dict[str, Any] = {"home": str(home)}
    if memory is not None:
        data["plugins"] = {"memory": dict(memory)}
    return Config.from_dict(data)


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("AGENTKEEL_HOME", str(tmp_path / "home"))
    return Config.from_dict({})


def exchange(
    plugins: Plugins,
    config: Config,
    message: str,
    answer: str,
    *,
    user: str = "alice",
    session: str = "default",
    status: RunStatus = RunStatus.SUCCEEDED,
) -> AgentRequest:
    request = AgentRequest(message=message, user_id=user, session_id=session)
    response = AgentResponse(run_id=request.run_id, status=status, message=answer, plan=None)
    plugins.save_turn(request, response, config)
    return request


def load(
    plugins: Plugins, config: Config, *, user: str = "alice", session: str = "default"
) -> MemoryContext:
    return plugins.load_context(
        AgentRequest(message="next", user_id=user, session_id=session), config
    )


def test_round_trip_oldest_first_with_run_ids(plugins: Plugins, config: Config) -> None:
    first = exchange(plugins, config, "where is order 42?", "it shipped yesterday")
    second = exchange(plugins, config, "refund it", "refund issued", status=RunStatus.FAILED)

    context = load(plugins, config)

    assert context.turns == (
        {"role": "user", "content": "where is order 42?", "run_id": first.run_id},
        {"role": "assistant", "content": "it shipped yesterday", "run_id": first.run_id},
        {"role": "user", "content": "refund it", "run_id": second.run_id},
        {"role": "assistant", "content": "refund issued", "run_id": second.run_id},
    )
    assert "user: refund it" in context.render()
    assert (config.home / DB_FILENAME).is_file()


def test_status_and_timestamp_are_stored(plugins: Plugins, config: Config) -> None:
    request = exchange(plugins, config, "hi", "denied", status=RunStatus.DENIED)
    conn = sqlite3.connect(config.home / DB_FILENAME)
    try:
        rows = conn.execute(
            "SELECT role, status, ts, run_id FROM memory_turns ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("user", "denied", request.run_id),
        ("assistant", "denied", request.run_id),
    ]
    assert all(isinstance(r[2], float) and r[2] > 0 for r in rows)


def test_empty_memory_gives_empty_context(plugins: Plugins, config: Config) -> None:
    assert load(plugins, config) == MemoryContext()


def test_users_never_see_each_others_turns(plugins: Plugins, config: Config) -> None:
    exchange(plugins, config, "alice's secret", "noted", user="alice")
    exchange(plugins, config, "bob's secret", "noted", user="bob")

    alice = [t["content"] for t in load(plugins, config, user="alice").turns]
    bob = [t["content"] for t in load(plugins, config, user="bob").turns]

    assert alice == ["alice's secret", "noted"]
    assert bob == ["bob's secret", "noted"]
    assert load(plugins, config, user="mallory").turns == ()


def test_sessions_are_isolated(plugins: Plugins, config: Config) -> None:
    exchange(plugins, config, "in session a", "ok a", session="a")
    exchange(plugins, config, "in session b", "ok b", session="b")

    assert [t["content"] for t in load(plugins, config, session="a").turns] == [
        "in session a",
        "ok a",
    ]
    assert [t["content"] for t in load(plugins, config, session="b").turns] == [
        "in session b",
        "ok b",
    ]
    assert load(plugins, config, session="default").turns == ()


def test_default_limit_is_the_last_ten_turns(plugins: Plugins, config: Config) -> None:
    for i in range(8):
        exchange(plugins, config, f"q{i}", f"a{i}")

    turns = load(plugins, config).turns

    assert len(turns) == memory_sqlite.DEFAULT_RECENT_TURNS == 10
    assert [t["content"] for t in turns] == [
        "q3",
        "a3",
        "q4",
        "a4",
        "q5",
        "a5",
        "q6",
        "a6",
        "q7",
        "a7",
    ]


def test_configured_limit(
    plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, {"recent_turns": 3}, monkeypatch)
    for i in range(4):
        exchange(plugins, config, f"q{i}", f"a{i}")

    assert [t["content"] for t in load(plugins, config).turns] == ["a2", "q3", "a3"]

    off = make_config(tmp_path, {"recent_turns": 0}, monkeypatch)
    assert load(plugins, off) == MemoryContext()


@pytest.mark.parametrize("bad", [-1, "5", 2.5, True, 10**6])
def test_invalid_limit_is_named_and_falls_back(
    plugins: Plugins,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bad: Any,
) -> None:
    config = make_config(tmp_path, {"recent_turns": bad}, monkeypatch)
    with pytest.raises(ConfigError, match="plugins.memory.recent_turns"):
        memory_sqlite.recent_turns(config)

    exchange(plugins, config, "q", "a")
    with caplog.at_level(logging.WARNING, logger="agentkeel.memory"):
        assert len(load(plugins, config).turns) == 2
    assert "recent_turns" in caplog.text


def test_startup_rejects_an_invalid_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeSystem:  # only the attribute the hook reads
        config = make_config(tmp_path, {"recent_turns": -3}, monkeypatch)

    with pytest.raises(ConfigError):
        memory_sqlite.agentkeel_startup(system=FakeSystem())  # type: ignore[arg-type]


def test_follows_the_home_directory(
    plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKEEL_HOME", str(tmp_path / "one"))
    one = Config.from_dict({})
    exchange(plugins, one, "stored in one", "ok")

    monkeypatch.setenv("AGENTKEEL_HOME", str(tmp_path / "two"))
    two = Config.from_dict({})

    assert load(plugins, two).turns == ()
    assert len(load(plugins, one).turns) == 2
    assert (tmp_path / "two" / DB_FILENAME).is_file()


def test_corrupted_database_gives_empty_context_and_a_warning(
    plugins: Plugins, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    config.home.mkdir(parents=True)
    (config.home / DB_FILENAME).write_bytes(b"this is not a database, just garbage " * 200)

    with caplog.at_level(logging.WARNING, logger="agentkeel.memory"):
        context = load(plugins, config)
        exchange(plugins, config, "still served", "yes")  # must not raise either

    assert context == MemoryContext()
    warnings = [
        r for r in caplog.records if r.name == "agentkeel.memory" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    assert DB_FILENAME in warnings[0].getMessage()


def test_database_damaged_after_it_was_opened(
    plugins: Plugins, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    exchange(plugins, config, "before", "damage")
    memory_sqlite.close_connections()
    for name in (DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm"):
        path = config.home / name
        if path.exists():
            path.write_bytes(b"\x00garbage" * 1000)

    with caplog.at_level(logging.WARNING, logger="agentkeel.memory"):
        assert load(plugins, config) == MemoryContext()
    assert "agentkeel.memory" in {r.name for r in caplog.records}


def test_unopenable_home_gives_empty_context(
    plugins: Plugins, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    (config.home / DB_FILENAME).mkdir(parents=True)  # a directory where the file should be

    with caplog.at_level(logging.WARNING, logger="agentkeel.memory"):
        assert load(plugins, config) == MemoryContext()
    assert "without memory" in caplog.text


def test_shutdown_closes_and_later_calls_reopen(plugins: Plugins, config: Config) -> None:
    exchange(plugins, config, "q", "a")
    assert len(memory_sqlite._connections) == 1

    plugins.shutdown(system=object())

    assert len(memory_sqlite._connections) == 0
    assert len(load(plugins, config).turns) == 2


# --- the shared store helper ------------------------------------------------------


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
