"""The host's table of tools, filled through ``register`` callbacks per plugin."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

import attrs

from agentkeel.errors import ConfigError, ToolSpecError
from agentkeel.tools.decorator import spec_of
from agentkeel.types import ToolSpec


class _Ranked(Protocol):
    strength: int


class ToolRegistry:
    """The host's table of tools, filled through ``register`` callbacks per plugin."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolSpec] = {}
        self._view: Mapping[str, ToolSpec] = MappingProxyType(self._tools)

    def register_callback(self, plugin: str) -> Callable[[Any], None]:
        """A ``register`` function that attributes tools to ``plugin``."""

        def register(obj: Any) -> None:
            spec = spec_of(obj)
            if spec is None:
                raise ToolSpecError(
                    plugin, f"register() takes a function decorated with @agentkeel.tool or a ToolSpec, got {obj!r}"
                )
            self.add(spec, plugin)

        return register

    def add(self, spec: ToolSpec, plugin: str) -> None:
        # Not at module level: sandbox children import this module.
        import jsonschema

        from agentkeel.patterns import check_schema

        existing = self._tools.get(spec.name)
        if existing is not None:
            raise ToolSpecError(
                plugin,
                f"tool {spec.name!r} is already registered by plugin {existing.plugin!r}; two plugins cannot "
                f"provide one tool name: uninstall or disable one of them (AGENTKEEL_DISABLE_PLUGINS={plugin})",
            )
        for label, schema in (("args_schema", spec.args_schema), ("output_schema", spec.output_schema)):
            if schema is None:
                continue
            try:
                check_schema(schema)  # 2020-12, with ECMA-262 patterns
            except jsonschema.SchemaError as exc:
                raise ToolSpecError(plugin, f"tool {spec.name!r}: invalid {label}: {exc.message}") from exc
        if spec.args_schema.get("type") != "object":
            raise ToolSpecError(plugin, f"tool {spec.name!r}: args_schema must have \"type\": \"object\"")
        self._tools[spec.name] = attrs.evolve(spec, plugin=plugin)

    def remove_plugin(self, plugin: str) -> None:
        """Forget every tool ``plugin`` registered."""
        for name in [n for n, spec in self._tools.items() if spec.plugin == plugin]:
            del self._tools[name]

    def validate_references(self) -> None:
        """Every rollback and fallback target must be a registered tool."""
        for spec in self._tools.values():
            for kind, target in (("rollback", spec.rollback), ("fallback", spec.fallback)):
                if target is not None and target not in self._tools:
                    raise ToolSpecError(
                        spec.plugin, f"tool {spec.name!r}: {kind} target {target!r} is not a registered tool"
                    )
                if target == spec.name:
                    raise ToolSpecError(spec.plugin, f"tool {spec.name!r}: {kind} cannot name the tool itself")

    def check_sandboxes(
        self, sandboxes: Mapping[str, object], overrides: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        """Every tool's isolation must name a registered sandbox, and one that can stop it.

        A sandbox whose ``stops_sync_calls`` is False (the in-process one) abandons a
        sync call at its timeout while the thread runs on; a tool that is not
        retry-safe may run there only with ``allow_uncancellable=True``. The
        isolation checked is the one in effect: a ``[tools.NAME] isolation`` from
        ``overrides`` counts (``apply_overrides`` checks that it is not weaker).
        """
        for spec in self._tools.values():
            if spec.isolation not in sandboxes:
                raise ToolSpecError(
                    spec.plugin,
                    f"tool {spec.name!r} needs the {spec.isolation!r} sandbox, which no plugin provides "
                    f"(registered: {', '.join(sorted(sandboxes))})",
                )
            isolation = (overrides or {}).get(spec.name, {}).get("isolation", spec.isolation)
            if isolation not in sandboxes or _strength(sandboxes[isolation]) < _strength(sandboxes[spec.isolation]):
                isolation = spec.isolation  # an override that is not allowed: apply_overrides says why
            backend = sandboxes[isolation]
            if (not getattr(backend, "stops_sync_calls", True) and not spec.is_async
                    and not spec.retry_safe and not spec.allow_uncancellable):
                raise ToolSpecError(
                    spec.plugin,
                    f"tool {spec.name!r} is a sync tool that is not retry-safe, and the {isolation!r} sandbox "
                    f"cannot stop a sync call at its timeout: the thread runs on and its effect may happen "
                    f"after the step was given up. Give it isolation='subprocess' (or 'docker', here or in "
                    f"[tools.{spec.name}]), make it async, make it retry-safe (idempotent=True or an "
                    f"idempotency_key parameter), or accept the risk with @tool(allow_uncancellable=True): "
                    f"its timeouts then leave the step in_doubt",
                )

    def apply_overrides(self, overrides: Mapping[str, Mapping[str, Any]], sandboxes: Mapping[str, _Ranked]) -> None:
        """Apply per-tool config (``[tools.NAME]``: timeout, rate_limit, isolation, cost_usd, max_concurrency).

        A section naming a tool no plugin registers is a ``ConfigError`` (a typo
        would otherwise silently leave the tool unconstrained). Isolation may move
        to a sandbox at least as strong as the declared one, never a weaker one."""
        for tool_name, values in overrides.items():
            spec = self._tools.get(tool_name)
            if spec is None:
                known = ", ".join(sorted(self._tools)) or "none"
                raise ConfigError(
                    f"tools.{tool_name}: no loaded plugin registers a tool named {tool_name!r} "
                    f"(registered tools: {known}); fix the name or install the plugin that provides it"
                )
            isolation = values.get("isolation", spec.isolation)
            if isolation not in sandboxes:
                raise ConfigError(
                    f"tools.{tool_name}.isolation: no sandbox {isolation!r} is registered "
                    f"(registered: {', '.join(sorted(sandboxes))})"
                )
            if spec.accepts_run and isolation != spec.isolation:
                raise ConfigError(
                    f"tools.{tool_name}.isolation: tool {tool_name!r} takes the run's context (a 'run' "
                    f"parameter), which cannot leave the process: it runs {spec.isolation!r} only"
                )
            if isolation != spec.isolation and spec.source:
                # Not a Python function of its plugin (a proxy of an MCP server's tool, say): what
                # it calls runs elsewhere already, and the proxy cannot be imported by a sandbox.
                raise ConfigError(
                    f"tools.{tool_name}.isolation: tool {tool_name!r} comes from {spec.source} and runs "
                    f"{spec.isolation!r} only"
                    + ("; an MCP server is isolated by its own settings ([mcp.servers.NAME] isolation)"
                       if spec.source.startswith("mcp") else "")
                )
            if sandboxes[isolation].strength < sandboxes[spec.isolation].strength:
                raise ConfigError(
                    f"tools.{tool_name}.isolation: {isolation!r} is weaker than the {spec.isolation!r} "
                    f"the tool declares; isolation can be tightened in config, never loosened"
                )
            changes = dict(values)
            if "cost_usd" in changes:
                changes["cost_usd"] = float(changes["cost_usd"])
            if spec.derived:  # where each overridden value now comes from
                changes["derived"] = {**spec.derived, **dict.fromkeys(values, f"config [tools.{tool_name}]")}
            self._tools[tool_name] = attrs.evolve(spec, **changes)

    def as_mapping(self) -> Mapping[str, ToolSpec]:
        """A read-only live view of the table (no copy)."""
        return self._view

    def __getitem__(self, name: str) -> ToolSpec:
        return self._tools[name]

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def all(self) -> dict[str, ToolSpec]:
        return dict(self._tools)


def _strength(backend: object) -> int:
    return int(getattr(backend, "strength", 0))
