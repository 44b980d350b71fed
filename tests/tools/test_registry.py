"""The host's tool table: registration per plugin, cross-checks, and config overrides."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import ConfigError, ToolSpecError, tool
from agentkeel.tools.registry import ToolRegistry


class Backend:
    """Just what the registry reads of a sandbox backend: its isolation strength."""

    def __init__(self, strength: int) -> None:
        self.strength = strength


SANDBOXES: dict[str, Any] = {"inprocess": Backend(0), "subprocess": Backend(10), "docker": Backend(20),
                             "vm": Backend(30)}


def test_registry_rejects_duplicates_bad_schemas_and_unknown_targets() -> None:
    @tool(allow_uncancellable=True)
    def a() -> None: ...

    @tool(name="a", allow_uncancellable=True)
    def a2() -> None: ...

    @tool(args_schema={"type": "object", "properties": {"x": {"type": "nonsense"}}}, allow_uncancellable=True)
    def b(x: int) -> None: ...

    @tool(rollback="missing", allow_uncancellable=True)
    def c() -> None: ...

    registry = ToolRegistry()
    registry.register_callback("p1")(a)
    with pytest.raises(ToolSpecError, match="plugin 'p2': tool 'a' is already registered by plugin 'p1'"):
        registry.register_callback("p2")(a2)
    with pytest.raises(ToolSpecError, match="plugin 'p3': tool 'b': invalid args_schema"):
        registry.register_callback("p3")(b)
    with pytest.raises(ToolSpecError, match="plugin 'p4': register\\(\\) takes a function decorated"):
        registry.register_callback("p4")(lambda: None)
    registry.register_callback("p5")(c)
    with pytest.raises(ToolSpecError, match="plugin 'p5': tool 'c': rollback target 'missing'"):
        registry.validate_references()
    assert registry["a"].plugin == "p1"


def registry_of(*fns: Any, plugin: str = "p") -> ToolRegistry:
    registry = ToolRegistry()
    for fn in fns:
        registry.register_callback(plugin)(fn)
    return registry


def test_a_tool_cannot_be_its_own_rollback_or_fallback() -> None:
    @tool(fallback="loop", allow_uncancellable=True)
    def loop() -> None: ...

    with pytest.raises(ToolSpecError, match="plugin 'p': tool 'loop': fallback cannot name the tool itself"):
        registry_of(loop).validate_references()


def test_isolation_must_name_a_registered_sandbox() -> None:
    @tool(isolation="vm")
    def boxed() -> None: ...

    registry = registry_of(boxed, plugin="hyper")
    registry.check_sandboxes(SANDBOXES)
    with pytest.raises(ToolSpecError, match="plugin 'hyper': tool 'boxed' needs the 'vm' sandbox, which no plugin"):
        registry.check_sandboxes({"inprocess": Backend(0)})


def test_remove_plugin_forgets_only_its_tools() -> None:
    @tool(allow_uncancellable=True)
    def mine() -> None: ...

    @tool(allow_uncancellable=True)
    def theirs() -> None: ...

    registry = registry_of(mine, plugin="a")
    registry.register_callback("b")(theirs)
    registry.remove_plugin("a")
    assert "mine" not in registry and "theirs" in registry and len(registry) == 1


def test_overrides_apply_timeout_rate_limit_and_tighter_isolation() -> None:
    @tool(isolation="subprocess", timeout=30.0)
    def search(q: str) -> str:
        return q

    registry = registry_of(search)
    registry.apply_overrides({"search": {"timeout": 2.5, "rate_limit": 4.0, "isolation": "docker"}}, SANDBOXES)
    spec = registry["search"]
    assert (spec.timeout, spec.rate_limit, spec.isolation) == (2.5, 4.0, "docker")
    registry.apply_overrides({"search": {"isolation": "docker"}}, SANDBOXES)  # as strong: allowed
    assert registry.as_mapping()["search"].isolation == "docker"


def test_isolation_is_never_loosened_by_config() -> None:
    @tool(isolation="subprocess")
    def search(q: str) -> str:
        return q

    registry = registry_of(search)
    with pytest.raises(ConfigError, match="'inprocess' is weaker than the 'subprocess'"):
        registry.apply_overrides({"search": {"isolation": "inprocess"}}, SANDBOXES)
    with pytest.raises(ConfigError, match="no sandbox 'nowhere' is registered"):
        registry.apply_overrides({"search": {"isolation": "nowhere"}}, SANDBOXES)
    assert registry["search"].isolation == "subprocess"  # nothing applied


def test_override_naming_an_unregistered_tool_is_a_config_error() -> None:
    @tool(allow_uncancellable=True)
    def search(q: str) -> str:
        return q

    registry = registry_of(search)
    with pytest.raises(ConfigError, match=r"tools\.serach: no loaded plugin registers a tool named 'serach' "
                                          r"\(registered tools: search\)"):
        registry.apply_overrides({"serach": {"timeout": 1.0}}, SANDBOXES)
    with pytest.raises(ConfigError, match=r"registered tools: none"):
        ToolRegistry().apply_overrides({"search": {"timeout": 1.0}}, SANDBOXES)
