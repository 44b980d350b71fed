"""The ``@tool`` decorator: a function plus the ``ToolSpec`` the runtime needs.

``@tool`` leaves the function callable as it was and attaches a ``ToolSpec``;
plugins hand the function to ``register`` inside ``agentkeel_register_tools``
(see ``agentkeel.tools.registry``).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

from agentkeel.errors import ToolSpecError
from agentkeel.types import ToolSpec

F = TypeVar("F", bound=Callable[..., Any])

SPEC_ATTR = "__agentkeel_tool__"
IDEMPOTENCY_KEY_ARG = "idempotency_key"
RUN_ARG = "run"
"""A tool parameter of this name receives the call's ``RunContext`` (``inprocess`` tools only)."""

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

    ``idempotency_key`` and ``run`` are supplied by the runtime, so they are not part of the schema.
    """
    hints = typing.get_type_hints(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(fn).parameters.items():
        if name in (IDEMPOTENCY_KEY_ARG, RUN_ARG):
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
    allow_uncancellable: bool = False,
    requires_approval: bool = False,
    max_concurrency: int | None = None,
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
    allow_uncancellable: bool = False,
    requires_approval: bool = False,
    max_concurrency: int | None = None,
) -> Any:
    """Declare a tool. Usable bare (``@tool``) or with options (``@tool(...)``).

    The description defaults to the docstring, the argument schema to one
    derived from the type hints. A parameter named ``idempotency_key`` marks the
    tool as accepting the runtime's stable key (``run_id:step_id``).

    A parameter named ``run`` receives the call's ``RunContext`` (who asked: the
    request, its user and session, the principal; the run's budget), so a tool can
    act for the caller without the plan naming it; only ``inprocess`` tools may
    take it (a RunContext does not cross a process boundary).

    A sync tool in the ``inprocess`` sandbox runs on a thread that nothing can
    stop at its timeout: the call is abandoned, not ended, and its effect may
    still happen. For a tool that is not retry-safe (neither ``idempotent`` nor
    taking an ``idempotency_key``) that is refused at load time unless the tool
    says ``allow_uncancellable=True`` (accepting that such a timeout leaves the
    step ``in_doubt``); otherwise make it async, give it a stronger
    ``isolation`` ("subprocess", "docker"), or make it retry-safe.
    ``requires_approval=True`` makes every forward call wait for a human's
    approval (``agentkeel approve``) before it runs. ``max_concurrency=N`` lets at
    most N calls of the tool run at once in one process (parallel steps and
    concurrent runs together; the rest wait their turn).
    Declaration errors raise ``ToolSpecError`` at import time, naming the tool.
    """

    def decorate(func: F) -> F:
        tool_name = name or func.__name__
        if not isinstance(isolation, str) or not isolation:
            # Which sandboxes exist is known once plugins are loaded: the registry checks the name.
            raise ToolSpecError(
                func.__module__, f"tool {tool_name!r}: isolation must be a sandbox name, got {isolation!r}"
            )
        if isinstance(permissions, str):
            raise ToolSpecError(func.__module__, f"tool {tool_name!r}: permissions must be a list, not a string")
        try:
            schema = dict(args_schema) if args_schema is not None else schema_from_signature(func)
        except (NameError, TypeError) as exc:
            raise ToolSpecError(func.__module__, f"tool {tool_name!r}: cannot derive argument schema: {exc}") from exc
        if max_concurrency is not None and (
                isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1):
            raise ToolSpecError(
                func.__module__, f"tool {tool_name!r}: max_concurrency must be an integer >= 1 or None, "
                f"got {max_concurrency!r}")
        target = inspect.unwrap(func)
        accepts_run = RUN_ARG in inspect.signature(func).parameters
        if accepts_run and isolation != "inprocess":
            raise ToolSpecError(
                func.__module__, f"tool {tool_name!r}: only an inprocess tool may take the {RUN_ARG!r} parameter "
                f"(isolation is {isolation!r})")
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
            accepts_run=accepts_run,
            is_async=inspect.iscoroutinefunction(target),
            image=image,
            allow_uncancellable=bool(allow_uncancellable),
            requires_approval=bool(requires_approval),
            max_concurrency=max_concurrency,
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
