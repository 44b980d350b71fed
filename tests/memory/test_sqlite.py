"""The SQLite memory manager against real SQLite files (one plugin instance per system)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pluggy
import pytest
from agentkeel import hookspecs
from agentkeel.config import Config
from agentkeel.errors import ConfigError
from agentkeel.markers import PROJECT_NAME
from agentkeel.memory.assemble import DEFAULT_RECENT_TURNS, MemorySettings
from agentkeel.memory.sqlite import SQLiteMemory
from agentkeel.plugin.facade import Plugins
from agentkeel.plugin.manager import LoadedPlugins
from agentkeel.stores import DB_FILENAME
from agentkeel.types import AgentRequest, AgentResponse, MemoryContext, RunStatus


@pytest.fixture
def memory() -> Iterator[SQLiteMemory]:
    plugin = SQLiteMemory()
    yield plugin
    plugin.close_connections()


def plugins_with(memory: SQLiteMemory) -> Plugins:
    """A plugin manager holding only ``memory``, checked against the hookspecs."""
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(memory, name="agentkeel.memory.sqlite")
    pm.check_pending()
    return Plugins(LoadedPlugins(pm))


@pytest.fixture
def plugins(memory: SQLiteMemory) -> Plugins:
    return plugins_with(memory)


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
    return asyncio.run(plugins.load_context(
        AgentRequest(message="next", user_id=user, session_id=session), config
    ))


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
    context = load(plugins, config)
    assert context.empty and context.report is not None and context.report.used_tokens == 0


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


def test_default_limit_is_the_last_twenty_turns(plugins: Plugins, config: Config) -> None:
    for i in range(12):
        exchange(plugins, config, f"q{i}", f"a{i}")

    turns = load(plugins, config).turns

    assert len(turns) == DEFAULT_RECENT_TURNS == 20
    assert [t["content"] for t in turns] == [f"{r}{i}" for i in range(2, 12) for r in "qa"]


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
    with pytest.raises(ConfigError, match=r"plugins\.memory\.recent_turns"):
        MemorySettings.from_config(config)

    exchange(plugins, config, "q", "a")
    with caplog.at_level(logging.WARNING, logger="agentkeel.memory"):
        assert len(load(plugins, config).turns) == 2
    assert "recent_turns" in caplog.text


def test_startup_rejects_an_invalid_limit(
    plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, {"recent_turns": -3}, monkeypatch)
    with pytest.raises(ConfigError, match=r"plugins\.memory\.recent_turns"):
        plugins.startup(config=config, tools={}, sandboxes={}, system=None)
    assert plugins.startup(config=make_config(tmp_path, {"recent_turns": 3}), tools={}, sandboxes={},
                           system=None) == []


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
    memory: SQLiteMemory, plugins: Plugins, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    exchange(plugins, config, "before", "damage")
    memory.close_connections()
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


def test_shutdown_closes_and_later_calls_reopen(
    memory: SQLiteMemory, plugins: Plugins, config: Config
) -> None:
    exchange(plugins, config, "q", "a")
    assert len(memory._stores) == 1

    plugins.shutdown(config=config, tools={}, sandboxes={}, system=None)

    assert len(memory._stores) == 0
    assert len(load(plugins, config).turns) == 2


def test_each_instance_has_its_own_connections(memory: SQLiteMemory, config: Config) -> None:
    """One plugin instance per system: closing one system's memory leaves another's open."""
    other = SQLiteMemory()
    try:
        mine, theirs = plugins_with(memory), plugins_with(other)
        exchange(mine, config, "q", "a")
        assert [t["content"] for t in load(theirs, config).turns] == ["q", "a"]  # same file
        assert len(memory._stores) == len(other._stores) == 1
        memory.close_connections()
        assert len(memory._stores) == 0 and len(other._stores) == 1
        exchange(theirs, config, "still", "open")
        assert len(load(mine, config).turns) == 4
    finally:
        other.close_connections()


def test_the_default_plugin_is_one_instance_per_system() -> None:
    from agentkeel.testing import make_system

    with make_system() as one, make_system() as two:
        first = one.plugins.pm.get_plugin("agentkeel.memory.sqlite")
        second = two.plugins.pm.get_plugin("agentkeel.memory.sqlite")
    assert isinstance(first, SQLiteMemory) and isinstance(second, SQLiteMemory)
    assert first is not second
