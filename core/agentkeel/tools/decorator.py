"""The ``@tool`` decorator and the host-side tool registry.

``@tool`` leaves the function callable as it was and attaches a ``ToolSpec``;
plugins hand the function to ``register`` inside ``agentkeel_register_tools``.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

import attrs

from agentkeel.errors import ConfigError, ToolSpecError
from agentkeel.types import ISOLATIONS, ToolSpec

F = TypeVar("F", bound=Callable[..., Any])

SPEC_ATTR = "__agentkeel_tool__"
IDEMPOTENCY_KEY_ARG = "idempotency_key"

_SIMPLE_TYPES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    dict: {"type": "object"},
    list: {"type": "array"},
    type(None): {"type": "null"},
    Any: {},
}


def schema_for_annotation(annotation: Any) -> dict[str, Any]:
    """JSON Schema for a type hint: scalars, ``list[X]``, ``dict[str, X]``,
    ``X | None``, ``Literal[...]``. Unknown types give an unconstrained schema."""
    if annotation in _SIMPLE_TYPES:
        return dict(_SIMPLE_TYPES[annotation])
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_for_annotation(a) for a in args]}
    if origin in (list, tuple, set, frozenset) or origin is typing.Sequence:
        item = schema_for_annotation(args[0]) if args else {}
        return {"type": "array", "items": item}
    if origin in (dict, typing.Mapping) or origin is Mapping:
        value = schema_for_annotation(args[1]) if len(args) == 2 else {}
        return {"type": "object", "additionalProperties": value}
    return {}


def schema_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """Build the arguments' JSON Schema from ``fn``'s signature and type hints.

    ``idempotency_key`` is supplied by the runtime, so it is not part of the schema.
    """
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if name == IDEMPOTENCY_KEY_ARG:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = schema_for_annotation(hints.get(name, Any))
        if param.default is inspect.Parameter.empty:
            required.append(name)
        elif isinstance(param.default, (str, int, float, bool, type(None))):
            prop["default"] = param.default
        properties[name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


@overload
def tool(fn: F) -> F: ...


@overload
def tool(
    fn: None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    args_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
    permissions: Iterable[str] = (),
    idempotent: bool = False,
    rollback: str | None = None,
    fallback: str | None = None,
    isolation: str = "inprocess",
    timeout: float = 30.0,
    rate_limit: float | None = None,
    cost_usd: float = 0.0,
    image: str | None = None,
) -> Callable[[F], F]: ...


def tool(
    fn: F | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    args_schema: Mapping[str, Any] | None = None,
    output_schema: Mapping[str, Any] | None = None,
    permissions: Iterable[str] = (),
    idempotent: bool = False,
    rollback: str | None = None,
    fallback: str | None = None,
    isolation: str = "inprocess",
    timeout: float = 30.0,
    rate_limit: float | None = None,
    cost_usd: float = 0.0,
    image: str | None = None,
) -> Any:
    """Declare a tool. Usable bare (``@tool``) or with options (``@tool(...)``).

    The description defaults to the docstring, the argument schema to one
    derived from the type hints. A parameter named ``idempotency_key`` marks the
    tool as accepting the runtime's stable key (``run_id:step_id``).
    Declaration errors raise ``ToolSpecError`` at import time, naming the tool.
    """

    def decorate(func: F) -> F:
        tool_name = name or func.__name__
        if isolation not in ISOLATIONS:
            raise ToolSpecError(
                func.__module__, f"tool {tool_name!r}: isolation must be one of {ISOLATIONS}, got {isolation!r}"
            )
        if isinstance(permissions, str):
            raise ToolSpecError(func.__module__, f"tool {tool_name!r}: permissions must be a list, not a string")
        try:
            schema = dict(args_schema) if args_schema is not None else schema_from_signature(func)
        except (NameError, TypeError) as exc:
            raise ToolSpecError(func.__module__, f"tool {tool_name!r}: cannot derive argument schema: {exc}") from exc
        target = inspect.unwrap(func)
        spec = ToolSpec(
            name=tool_name,
            description=(description or inspect.getdoc(func) or "").strip(),
            fn=func,
            args_schema=schema,
            output_schema=dict(output_schema) if output_schema is not None else None,
            permissions=frozenset(permissions),
            idempotent=idempotent,
            rollback=rollback,
            fallback=fallback,
            isolation=isolation,
            timeout=float(timeout),
            rate_limit=rate_limit,
            cost_usd=cost_usd,
            accepts_key=IDEMPOTENCY_KEY_ARG in inspect.signature(func).parameters,
            is_async=inspect.iscoroutinefunction(target),
            image=image,
        )
        setattr(func, SPEC_ATTR, spec)
        return func

    if fn is not None:
        return decorate(fn)
    return decorate


def spec_of(obj: Any) -> ToolSpec | None:
    """The ``ToolSpec`` of a decorated function, or the object itself if it is one."""
    if isinstance(obj, ToolSpec):
        return obj
    spec = getattr(obj, SPEC_ATTR, None)
    return spec if isinstance(spec, ToolSpec) else None


class ToolRegistry:
    """The host's table of tools, filled through ``register`` callbacks per plugin."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolSpec] = {}

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
        import jsonschema  # not at module level: sandbox children import this module

        existing = self._tools.get(spec.name)
        if existing is not None:
            raise ToolSpecError(
                plugin, f"tool {spec.name!r} is already registered by plugin {existing.plugin!r}"
            )
        for label, schema in (("args_schema", spec.args_schema), ("output_schema", spec.output_schema)):
            if schema is None:
                continue
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise ToolSpecError(plugin, f"tool {spec.name!r}: invalid {label}: {exc.message}") from exc
        if spec.args_schema.get("type") != "object":
            raise ToolSpecError(plugin, f"tool {spec.name!r}: args_schema must have \"type\": \"object\"")
        self._tools[spec.name] = attrs.evolve(spec, plugin=plugin)

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

    def apply_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> None:
        """Apply per-tool config (``[tools.NAME]``: timeout, rate_limit, isolation)."""
        for tool_name, values in overrides.items():
            spec = self._tools.get(tool_name)
            if spec is None:
                continue  # config may name tools of plugins that are not installed
            isolation = values.get("isolation", spec.isolation)
            if ISOLATIONS.index(isolation) < ISOLATIONS.index(spec.isolation):
                raise ConfigError(
                    f"tools.{tool_name}.isolation: {isolation!r} is weaker than the {spec.isolation!r} "
                    f"the tool declares; isolation can be tightened in config, never loosened"
                )
            self._tools[tool_name] = attrs.evolve(spec, **values)

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

