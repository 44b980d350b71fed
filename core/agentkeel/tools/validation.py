"""JSON Schema validation, fast on the per-step path and precise in its messages.

Arguments are validated for every step, so the check must be cheap.
``jsonschema`` interprets a schema on every call (about 25 µs for a small
object); ``fastjsonschema`` compiles it to Python once (about 1 µs per call).
The compiled check is used only for schemas made of keywords that mean the
same in draft-07 (fastjsonschema's newest draft) and 2020-12; any other schema
is checked by ``jsonschema`` alone, so the semantics are always 2020-12's.
Error messages always come from ``jsonschema``: they name the field.

Patterns are ECMA-262, as JSON Schema defines them, on both paths: ``jsonschema``
is ``agentkeel.patterns.Validator``, and the compiled check's pattern table (the
``REGEX_PATTERNS`` its generated code looks patterns up in) is refilled with the
same ECMA-262 regexes; when that table is not what is expected (another
``fastjsonschema``, or a pattern ``re`` cannot compile) the schema is checked by
``jsonschema`` alone. A schema with a pattern that is not ECMA-262 fails every
value, with an error naming the field, rather than being evaluated some other way.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema

from agentkeel.patterns import Validator, ecma_regex, pattern_problems
from agentkeel.types import ToolSpec

# Keywords whose meaning is identical in draft-07 and 2020-12 (``items`` only as
# a single schema; ``format`` is not asserted by either configuration used here).
_PORTABLE = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "enum", "const",
        "anyOf", "oneOf", "allOf", "not", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "multipleOf", "minLength", "maxLength", "pattern",
        "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties",
        "items", "default", "description", "title", "examples", "format",
    }
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")


def _portable_patterns(schema: Any, found: set[str] | None = None) -> set[str] | None:
    """The ``pattern`` values of a schema made of portable keywords only (None when it is not)."""
    found = set() if found is None else found
    if isinstance(schema, bool):
        return found
    if not isinstance(schema, Mapping) or not _PORTABLE.issuperset(schema):
        return None
    if isinstance(schema.get("items"), list):
        return None
    if "pattern" in schema:
        if not isinstance(schema["pattern"], str):
            return None
        found.add(schema["pattern"])
    subs: list[Any] = list(schema.get("properties", {}).values())
    for key in ("additionalProperties", "not", "items"):
        if isinstance(schema.get(key), (Mapping, bool)):
            subs.append(schema[key])
    for key in _SCHEMA_LISTS:
        subs.extend(schema.get(key, ()))
    for sub in subs:
        if _portable_patterns(sub, found) is None:
            return None
    return found


class _EcmaSearch:
    """What the compiled check calls ``.search`` on: an ECMA-262 regex in place of ``re``'s."""

    __slots__ = ("search",)

    def __init__(self, pattern: str) -> None:
        self.search = ecma_regex(pattern).find


def _compiled_check(schema: Mapping[str, Any]) -> Callable[[Any], bool] | None:
    """The fastjsonschema check of a portable schema with ECMA-262 patterns, or None."""
    wanted = _portable_patterns(schema)
    if wanted is None:
        return None
    try:
        compiled = fastjsonschema.compile(dict(schema), use_default=False, use_formats=False)
    except (re.error, fastjsonschema.JsonSchemaDefinitionException):
        return None  # a pattern re cannot compile (ECMA-262 has syntax re lacks), or a schema it refuses
    table = getattr(compiled, "__globals__", {}).get("REGEX_PATTERNS")
    if wanted or table:
        if not isinstance(table, dict) or set(table) != wanted:
            return None  # not the generated code this was written against: jsonschema alone
        for pattern in wanted:
            table[pattern] = _EcmaSearch(pattern)
    return _boolean(compiled)


class CompiledSchema:
    """One schema: a fast ``is_valid`` and field-naming ``errors``."""

    __slots__ = ("fast", "is_valid", "problems", "schema", "validator")

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self.validator = Validator(schema)
        self.problems = pattern_problems(schema)
        self.is_valid: Callable[[Any], bool] = self.validator.is_valid
        compiled = None if self.problems else _compiled_check(schema)
        self.fast = compiled is not None  # checked by the compiled check rather than by jsonschema
        if self.problems:
            self.is_valid = _never
        elif compiled is not None:
            self.is_valid = compiled

    def errors(self, value: Any, what: str = "argument") -> list[str]:
        if self.is_valid(value):
            return []
        if self.problems:
            return [f"{what}s: the schema is invalid: {problem}" for problem in self.problems]
        out = []
        for error in sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
            field = ".".join(str(p) for p in error.absolute_path)
            out.append(f"{what} {field}: {error.message}" if field else f"{what}s: {error.message}")
        return out


def _never(value: Any) -> bool:
    return False


def _boolean(compiled: Callable[[Any], Any]) -> Callable[[Any], bool]:
    def is_valid(value: Any) -> bool:
        try:
            compiled(value)
        except fastjsonschema.JsonSchemaException:
            return False
        return True

    return is_valid


class _CompiledCache:
    """Compiled schemas by the identity of the schema object, least recently used
    dropped past ``size``. A compiled schema depends on the schema alone, never on a
    configuration, so sharing it between systems is safe; the bound keeps a process
    that builds many systems (or many plans with ``expect`` schemas) from growing."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._items: OrderedDict[int, CompiledSchema] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, schema: Mapping[str, Any]) -> CompiledSchema:
        key = id(schema)
        cached = self._items.get(key)
        if cached is not None and cached.schema is schema:  # the identity check guards against id reuse
            return cached
        compiled = CompiledSchema(schema)
        with self._lock:
            self._items[key] = compiled
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._items)


_compiled = _CompiledCache()


def compiled_schema(schema: Mapping[str, Any]) -> CompiledSchema:
    return _compiled.get(schema)


def schema_errors(schema: Mapping[str, Any], value: Any, what: str = "argument") -> list[str]:
    """Every way ``value`` breaks ``schema``, each naming the field (empty when valid)."""
    return compiled_schema(schema).errors(value, what)


def args_errors(spec: ToolSpec, args: Mapping[str, Any]) -> list[str]:
    return compiled_schema(spec.args_schema).errors(args)
