"""The default permissions gate.

Principals come from ``[principals.NAME]`` in the config; an unknown user is
not a principal and gets nothing. A principal may call a tool when it holds
every permission the tool declares, the tool is on its ``tools`` allow-list
(when it has one), and the arguments meet its ``constraints`` for that tool.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jsonschema

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.types import Decision, Principal, ToolSpec

_validators: dict[tuple[str, str], jsonschema.Draft202012Validator] = {}


@hookimpl(trylast=True)
def agentkeel_resolve_principal(user_id: str, config: Config) -> Principal | None:
    return config.principals.get(user_id)


@hookimpl(trylast=True)
def agentkeel_authorize(principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None) -> Decision:
    missing = tool.permissions - principal.permissions
    if missing:
        return Decision(False, f"{principal.name!r} lacks permission(s) {sorted(missing)} for {tool.name!r}")
    if principal.tools is not None and tool.name not in principal.tools:
        return Decision(False, f"{tool.name!r} is not on the tool list of {principal.name!r}")
    constraints = principal.constraints.get(tool.name)
    if args is not None and constraints:
        error = _constraint_error(principal, tool.name, constraints, args)
        if error:
            return Decision(False, error)
    return _allowed(tool.permissions)


@functools.lru_cache(maxsize=1024)
def _allowed(permissions: frozenset[str]) -> Decision:
    return Decision(True, "holds " + (", ".join(sorted(permissions)) or "no permission needed"))


def _constraint_error(
    principal: Principal, tool_name: str, constraints: Mapping[str, Any], args: Mapping[str, Any]
) -> str | None:
    key = (principal.name, tool_name)
    validator = _validators.get(key)
    if validator is None:
        validator = jsonschema.Draft202012Validator({"type": "object", "properties": dict(constraints)})
        _validators[key] = validator
    error = jsonschema.exceptions.best_match(validator.iter_errors(dict(args)))
    if error is None:
        return None
    field = ".".join(str(p) for p in error.absolute_path) or "arguments"
    return f"constraint of {principal.name!r} on {tool_name}.{field}: {error.message}"
