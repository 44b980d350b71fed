"""Plugin loading: entry points, allow/block lists and errors that name the plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentkeel import PluginError, RunStatus, ToolSpecError, UnknownModelPriceError, hookimpl, tool
from agentkeel.memory.sqlite import SQLiteMemory
from agentkeel.planner.llm import LLMPlanner
from agentkeel.plugin.facade import Plugins
from agentkeel.plugin.manager import DEFAULT_NAMES, DEFAULT_PLUGINS, LEGACY_NAMES, build_plugin_manager
from agentkeel.testing import ScriptedPlanner, make_system


def fake_distribution(root: Path, name: str, module_source: str) -> None:
    """An installed distribution with an ``agentkeel`` entry point, as pip would leave it."""
    (root / f"{name}.py").write_text(module_source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[agentkeel]\n{name} = {name}\n")


def test_plugin_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "broken_plugin", "raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"plugin 'broken_plugin': failed to load .*needs libfoo"):
        build_plugin_manager()
    tolerant = build_plugin_manager(tolerant=True)  # for inspection: the rest still loads
    [broken] = tolerant.broken
    assert broken.name == "broken_plugin" and "needs libfoo" in broken.error
    assert tolerant.pm.get_plugin("broken_plugin") is None
    assert all(tolerant.pm.has_plugin(name) for name in DEFAULT_NAMES)
    described = {p["name"]: p for p in Plugins(tolerant).describe()}
    assert "needs libfoo" in described["broken_plugin"]["error"]
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "broken_plugin")
    loaded = build_plugin_manager()
    assert loaded.pm.get_plugin("broken_plugin") is None and loaded.broken == []


def test_allow_list_loads_only_named_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "extra_plugin", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "extra_plugin")
    loaded = build_plugin_manager()
    pm = loaded.pm
    assert pm.get_plugin("extra_plugin") is not None
    assert pm.get_plugin("support") is None
    assert all(pm.get_plugin(entry.partition(":")[0]) is not None for entry in DEFAULT_PLUGINS)
    assert loaded.distributions == {"extra_plugin": ("extra_plugin", "0.1")}
    described = {p["name"]: p for p in Plugins(loaded).describe()}
    assert described["extra_plugin"]["version"] == "0.1"
    assert described["extra_plugin"]["default"] is False
    assert described["agentkeel.memory.sqlite"]["default"] is True
    assert described["agentkeel.memory.sqlite"]["distribution"] == "agentkeel"


def test_default_plugins_are_registered_by_dotted_name_and_stateful_ones_per_build() -> None:
    first, second = build_plugin_manager(load_entrypoints=False), build_plugin_manager(load_entrypoints=False)
    names = {name for name, plugin in first.pm.list_name_plugin() if plugin is not None}
    assert names == set(DEFAULT_NAMES) == {entry.partition(":")[0] for entry in DEFAULT_PLUGINS}
    assert set(LEGACY_NAMES.values()) <= names
    assert not any(first.pm.has_plugin(short) for short in LEGACY_NAMES)  # only dotted names now
    for name, cls in (("agentkeel.memory.sqlite", SQLiteMemory), ("agentkeel.planner.llm", LLMPlanner)):
        mine, theirs = first.pm.get_plugin(name), second.pm.get_plugin(name)
        assert isinstance(mine, cls) and isinstance(theirs, cls) and mine is not theirs
    # A module plugin is the module itself, shared: it keeps no state.
    assert first.pm.get_plugin("agentkeel.cost.pricing") is second.pm.get_plugin("agentkeel.cost.pricing")


@pytest.mark.parametrize("blocked", ["memory_sqlite,planner_llm", "agentkeel.memory.sqlite, agentkeel.planner.llm"])
def test_defaults_are_disabled_by_legacy_or_dotted_name(monkeypatch: pytest.MonkeyPatch, blocked: str) -> None:
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", blocked)
    pm = build_plugin_manager(load_entrypoints=False).pm
    assert pm.get_plugin("agentkeel.memory.sqlite") is None and pm.get_plugin("agentkeel.planner.llm") is None
    assert pm.is_blocked("agentkeel.memory.sqlite") and pm.is_blocked("agentkeel.planner.llm")
    assert pm.get_plugin("agentkeel.planner.rules") is not None
    # A blocked plugin stays blocked: registering it again under its name is refused quietly.
    assert pm.register(SQLiteMemory(), name="agentkeel.memory.sqlite") is None


def test_a_class_passed_as_a_plugin_is_refused() -> None:
    class Plugin:
        @hookimpl
        def agentkeel_event(self, event: Any) -> None: ...

    with pytest.raises(PluginError, match="is a class; register an instance of it"):
        build_plugin_manager(load_entrypoints=False, plugins=[Plugin])
    loaded = build_plugin_manager(load_entrypoints=False, plugins=[Plugin], tolerant=True)
    assert [b.name for b in loaded.broken] == ["Plugin"]


def test_misspelled_hook_fails_loudly() -> None:
    class Typo:
        @hookimpl
        def agentkeel_registr_tools(self, register: Any) -> None: ...

    with pytest.raises(PluginError, match="agentkeel_registr_tools"):
        build_plugin_manager(load_entrypoints=False, plugins=[Typo()])


def test_bad_tool_registration_names_the_plugin() -> None:
    class Bad:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            @tool(fallback="nowhere", allow_uncancellable=True)
            def lost() -> None: ...

            register(lost)

    with pytest.raises(ToolSpecError, match="plugin 'Bad': tool 'lost': fallback target 'nowhere'"):
        make_system(Bad())


def test_unknown_model_price_is_an_error_not_free() -> None:
    with make_system() as system:
        with pytest.raises(UnknownModelPriceError, match="my-model"):
            system.pricer.price("my-model")
        assert system.pricer.price("gpt-4o-mini").output_per_mtok == pytest.approx(0.6)
    prices = {"my-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}
    with make_system(config={"prices": prices}) as priced:
        assert priced.pricer.price("my-model").input_per_mtok == 1.0


async def test_rate_limit_refuses_calls_beyond_the_rate() -> None:
    from agentkeel import AgentRequest

    calls: list[int] = []

    class Limited:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            @tool(permissions=["net"], idempotent=True, rate_limit=0.01, timeout=0.05)
            async def ping(n: int) -> int:
                calls.append(n)
                return n

            register(ping)

    wire = {"reasoning": "", "steps": [
        {"description": "", "tool_name": "ping", "tool_args": {"n": i}} for i in range(2)
    ]}
    system = make_system(Limited(), ScriptedPlanner(wire), principals={"tester": ["net"]},
                         config={"retry": {"base_delay_s": 0, "max_attempts": 2}})
    async with system:
        response = await system.run(AgentRequest(message="m", user_id="tester"))
    assert response.status is RunStatus.FAILED
    assert calls == [0]  # the burst allows one call; the second is refused, not queued for 100 s
    assert "rate" in (response.steps[1].error or "").lower()
