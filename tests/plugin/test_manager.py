"""Plugin loading: entry points, allow/block lists and errors that name the plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentkeel import PluginError, RunStatus, ToolSpecError, UnknownModelPriceError, hookimpl, tool
from agentkeel.plugin.manager import DEFAULT_PLUGINS, Plugins, build_plugin_manager
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
    with pytest.raises(PluginError, match="plugin 'broken_plugin': failed to load .*needs libfoo"):
        build_plugin_manager()
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "broken_plugin")
    assert build_plugin_manager().get_plugin("broken_plugin") is None


def test_allow_list_loads_only_named_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_distribution(tmp_path, "extra_plugin", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "extra_plugin")
    pm = build_plugin_manager()
    assert pm.get_plugin("extra_plugin") is not None
    assert pm.get_plugin("support") is None
    assert all(pm.get_plugin(m.rsplit(".", 1)[-1]) is not None for m in DEFAULT_PLUGINS)
    described = {p["name"]: p for p in Plugins(pm).describe()}
    assert described["extra_plugin"]["version"] == "0.1"


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
            @tool(fallback="nowhere")
            def lost() -> None: ...

            register(lost)

    with pytest.raises(ToolSpecError, match="fallback target 'nowhere'"):
        make_system(Bad())


def test_unknown_model_price_is_an_error_not_free() -> None:
    system = make_system()
    with pytest.raises(UnknownModelPriceError, match="my-model"):
        system.pricer.price("my-model")
    priced = make_system(config={"prices": {"my-model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}})
    assert priced.pricer.price("my-model").input_per_mtok == 1.0
    assert make_system().pricer.price("gpt-4o-mini").output_per_mtok == pytest.approx(0.6)


async def test_rate_limit_refuses_calls_beyond_the_rate() -> None:
    from agentkeel import AgentRequest

    calls: list[int] = []

    class Limited:
        @hookimpl
        def agentkeel_register_tools(self, register: Any) -> None:
            @tool(idempotent=True, rate_limit=0.01, timeout=0.05)
            async def ping(n: int) -> int:
                calls.append(n)
                return n

            register(ping)

    wire = {"reasoning": "", "steps": [
        {"description": "", "tool_name": "ping", "tool_args": {"n": i}} for i in range(2)
    ]}
    system = make_system(Limited(), ScriptedPlanner(wire), config={"retry": {"base_delay_s": 0, "max_attempts": 2}})
    async with system:
        response = await system.run(AgentRequest(message="m", user_id="tester"))
    assert response.status is RunStatus.FAILED
    assert calls == [0]  # the burst allows one call; the second is refused, not queued for 100 s
    assert "rate" in (response.steps[1].error or "").lower()
