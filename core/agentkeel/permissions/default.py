"""The default permissions gate.

Principals come from ``[principals.NAME]`` in the config; an unknown user is
not a principal and gets nothing. A principal may call a tool when it holds
every permission the tool declares, the tool is on its ``tools`` allow-list
(when it has one), and the arguments meet its ``constraints`` for that tool.

Deny by default: a tool that declares no permissions is callable only by a
principal that lists it explicitly in its ``tools`` allow-list. Holding no
permission is not a grant.

One ``PermissionsGate`` per system: the compiled constraint validators belong
to the configuration they came from, never to another system in the process.
Constraints are JSON Schemas checked like tool arguments (``CompiledSchema``:
the compiled check, messages from ``jsonschema``), so a ``pattern`` is an
ECMA-262 regular expression: ``$`` does not match before a trailing newline.
A constraint whose pattern is not ECMA-262 (``Config`` refuses it at load time)
denies every call rather than being evaluated some other way.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jsonschema

from agentkeel.config import Config
from agentkeel.markers import hookimpl
from agentkeel.tools.validation import CompiledSchema
from agentkeel.types import Decision, Principal, ToolSpec


class PermissionsGate:
    """The default ``agentkeel_resolve_principal`` and ``agentkeel_authorize``."""

    def __init__(self) -> None:
        # (principal, tool) -> (the constraints object it was compiled from, compiled schema)
        self._validators: dict[tuple[str, str], tuple[Mapping[str, Any], CompiledSchema]] = {}

    @hookimpl(trylast=True)
    def agentkeel_resolve_principal(self, user_id: str, config: Config) -> Principal | None:
        return config.principals.get(user_id)

    @hookimpl(trylast=True)
    def agentkeel_authorize(self, principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None) -> Decision:
        missing = tool.permissions - principal.permissions
        if missing:
            return Decision(False, f"{principal.name!r} lacks permission(s) {sorted(missing)} for {tool.name!r}")
        listed = principal.tools is not None and tool.name in principal.tools
        if principal.tools is not None and not listed:
            return Decision(False, f"{tool.name!r} is not on the tool list of {principal.name!r}")
        if not tool.permissions and not listed:
            return Decision(
                False,
                f"{tool.name!r} declares no permissions, so it is callable only by principals that list it: "
                f"add it to [principals.{principal.name}] tools",
            )
        constraints = principal.constraints.get(tool.name)
        if args is not None and constraints:
            error = self._constraint_error(principal, tool.name, constraints, args)
            if error:
                return Decision(False, error)
        return _allowed(tool.permissions)

    def _constraint_error(
        self, principal: Principal, tool_name: str, constraints: Mapping[str, Any], args: Mapping[str, Any]
    ) -> str | None:
        key = (principal.name, tool_name)
        cached = self._validators.get(key)
        if cached is None or cached[0] is not constraints:
            compiled = CompiledSchema({"type": "object", "properties": dict(constraints)})
            cached = self._validators[key] = (constraints, compiled)
        compiled = cached[1]
        values = dict(args)
        if compiled.is_valid(values):
            return None
        if compiled.problems:
            return f"constraint of {principal.name!r} on {tool_name} is invalid: {'; '.join(compiled.problems)}"
        error = jsonschema.exceptions.best_match(compiled.validator.iter_errors(values))
        if error is None:
            return None
        field = ".".join(str(p) for p in error.absolute_path) or "arguments"
        return f"constraint of {principal.name!r} on {tool_name}.{field}: {error.message}"


@functools.lru_cache(maxsize=256)
def _allowed(permissions: frozenset[str]) -> Decision:
    return Decision(True, "holds " + (", ".join(sorted(permissions)) or "an explicit grant"))
