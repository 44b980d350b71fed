"""From an MCP tool listing to agentkeel ``ToolSpec``s, with every derived field's origin.

MCP tools declare no production metadata, so it is derived safely and the
operator may override it (``[mcp.servers.NAME]`` for every tool of a server,
``[mcp.servers.NAME.tools.TOOL]`` for one tool; the tool's own value wins).

``idempotent`` (retry-safety: the core retries only retry-safe tools) from the
tool's annotations, unless configured:

============================================  ===========  ===============================
annotations                                   idempotent   ``derived["idempotent"]``
============================================  ===========  ===============================
``readOnlyHint: true``                        True         ``readOnlyHint``
``destructiveHint: true`` (not read-only)     False        ``destructiveHint``
``idempotentHint: true``, ``destructiveHint:  True         ``idempotentHint``
false``
``idempotentHint: true`` alone                False        ``idempotentHint ignored: ...``
none of these                                 False        ``no readOnlyHint or ...``
============================================  ===========  ===============================

``idempotentHint`` is trusted only with ``destructiveHint: false``: the MCP
default of ``destructiveHint`` is true, and a wrong hint on a destructive
tool is the one whose retry does the most damage. ``idempotent = true`` in the
configuration makes such a tool retry-safe on the operator's word.

``permissions``: the tool's list, else the server's, else none, which in
agentkeel is deny by default (only principals listing the tool under
``tools = [...]`` may call it). ``timeout``: the tool's, else the server's,
else 30 s. ``rollback``, ``fallback``, ``rate_limit``, ``requires_approval``,
``cost_usd``: only when configured (a server-wide ``rollback`` or ``fallback``
is not applied to the tool it names).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema
import mcp.types as types
from agentkeel.errors import ConfigError
from agentkeel.patterns import check_schema
from agentkeel.types import ToolSpec

from agentkeel_mcp.config import DEFAULT_TIMEOUT_S, Overrides, ServerConfig
from agentkeel_mcp.runtime import McpServerError

NO_PERMISSIONS = "none configured: explicit grant only"

ProxyFactory = Callable[[str, str, bool], Callable[..., Any]]
"""``(remote tool name, agentkeel tool name, retry-safe) -> async fn`` that calls the tool."""


def idempotent_from_hints(annotations: types.ToolAnnotations | None) -> tuple[bool, str]:
    """Retry-safety from the MCP hints, and which hint decided it (the table above)."""
    hints = annotations or types.ToolAnnotations()
    if hints.read_only_hint is True:
        return True, "readOnlyHint"
    if hints.destructive_hint is True:
        return False, "destructiveHint"
    if hints.idempotent_hint is True:
        if hints.destructive_hint is False:
            return True, "idempotentHint"
        return False, "idempotentHint ignored: destructiveHint not false (MCP default: destructive)"
    return False, "no readOnlyHint or idempotentHint (MCP default: not idempotent)"


TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
"""The tool names the MCP specification allows (a server's other names are left out)."""
log = logging.getLogger("agentkeel.mcp")


def exposed(cfg: ServerConfig, listed: Sequence[types.Tool], source: str = "<config>") -> list[types.Tool]:
    """The listed tools that ``include``/``exclude`` let through; unknown names are a ``ConfigError``."""
    names = [tool.name for tool in listed]
    known = set(names)
    where = f"mcp.servers.{cfg.name}"
    checks: list[tuple[str, Any]] = [("include", cfg.include or ()), ("exclude", cfg.exclude),
                                     ("tools", cfg.tools)]
    for key, wanted in checks:
        unknown = sorted(set(wanted) - known)
        if unknown:
            which = ", ".join(f"{where}.{key}.{name}" if key == "tools" else repr(name) for name in unknown)
            raise ConfigError(
                f"invalid configuration in {source}: {where}.{key}: {which} is not a tool of {cfg.label} "
                f"(it lists: {', '.join(sorted(known)) or 'no tools'})"
            )
    out = []
    for tool in listed:
        if not (cfg.include is None or tool.name in cfg.include) or tool.name in cfg.exclude:
            continue
        if not TOOL_NAME.fullmatch(tool.name):
            # A name with spaces, control characters or hundreds of characters would reach plans,
            # prompts and log lines as it is: such a tool is left out, and said so.
            log.warning("%s: tool %r left out: MCP tool names are 1 to 128 of A-Z a-z 0-9 _ - .",
                        cfg.label, tool.name[:200])
            continue
        out.append(tool)
    return out


def build_specs(cfg: ServerConfig, listed: Sequence[types.Tool], proxy: ProxyFactory,
                source: str = "<config>") -> list[ToolSpec]:
    """One ``ToolSpec`` per exposed tool of the server."""
    return [build_spec(cfg, tool, proxy) for tool in exposed(cfg, listed, source)]


def build_spec(cfg: ServerConfig, tool: types.Tool, proxy: ProxyFactory) -> ToolSpec:
    name = cfg.tool_name(tool.name)
    own = cfg.tools.get(tool.name, Overrides())
    derived: dict[str, str] = {}

    def pick(field: str) -> tuple[Any, str | None]:
        value = getattr(own, field)
        if value is not None:
            return value, f"config {cfg.tool_section(tool.name)}"
        value = getattr(cfg.overrides, field)
        if value is not None:
            return value, f"config {cfg.section}"
        return None, None

    def configured(field: str) -> Any:
        value, origin = pick(field)
        if origin is not None:
            derived[field] = origin
        return value

    idempotent, origin = pick("idempotent")
    if origin is None:
        idempotent, origin = idempotent_from_hints(tool.annotations)
    derived["idempotent"] = origin
    permissions, origin = pick("permissions")
    derived["permissions"] = origin or NO_PERMISSIONS
    timeout, origin = pick("timeout")
    derived["timeout"] = origin or f"default {DEFAULT_TIMEOUT_S:g}s"
    links: dict[str, str | None] = {}
    for field in ("rollback", "fallback"):
        value, origin = pick(field)
        if value == name and origin == f"config {cfg.section}":
            value = None  # a server-wide target is not the tool's own compensator or fallback
        elif origin is not None:
            derived[field] = origin
        links[field] = value
    rate_limit = configured("rate_limit")
    requires_approval = configured("requires_approval")
    cost_usd = configured("cost_usd")
    args_schema = _schema(cfg, tool, "inputSchema", tool.input_schema)
    if args_schema.get("type") != "object":
        raise McpServerError(f"{cfg.label}: tool {tool.name!r} has an inputSchema that is not of type \"object\"; "
                             f"hide it with exclude = [{tool.name!r}] in {cfg.section}")
    output_schema = _schema(cfg, tool, "outputSchema", tool.output_schema) if tool.output_schema else None
    return ToolSpec(
        name=name,
        description=_description(cfg, tool),
        fn=proxy(tool.name, name, bool(idempotent)),
        args_schema=args_schema,
        output_schema=output_schema,
        permissions=frozenset(permissions or ()),
        idempotent=bool(idempotent),
        rollback=links["rollback"],
        fallback=links["fallback"],
        isolation="inprocess",  # the proxy runs in-process; the server is the separate process
        timeout=float(timeout if timeout is not None else DEFAULT_TIMEOUT_S),
        rate_limit=rate_limit,
        cost_usd=float(cost_usd or 0.0),
        is_async=True,
        requires_approval=bool(requires_approval),
        source=cfg.source,
        derived=derived,
    )


def _schema(cfg: ServerConfig, tool: types.Tool, label: str, schema: Mapping[str, Any]) -> dict[str, Any]:
    try:
        check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise McpServerError(
            f"{cfg.label}: tool {tool.name!r} declares an invalid {label} ({exc.message}); hide it with "
            f"exclude = [{tool.name!r}] in {cfg.section}"
        ) from exc
    return dict(schema)


def _description(cfg: ServerConfig, tool: types.Tool) -> str:
    title = tool.title or (tool.annotations.title if tool.annotations else None)
    text = (tool.description or "").strip() or (title or "").strip()
    return text or f"The tool {tool.name!r} of {cfg.label}."
