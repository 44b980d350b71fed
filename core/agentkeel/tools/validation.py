"""JSON Schema validation, fast on the per-step path and precise in its messages.

Arguments are validated for every step, so the check must be cheap.
``jsonschema`` interprets a schema on every call (about 25 µs for a small
object); ``fastjsonschema`` compiles it to Python once (about 1 µs per call).
The compiled check is used only for schemas made of keywords that mean the
same in draft-07 (fastjsonschema's newest draft) and 2020-12; any other schema
is checked by ``jsonschema`` alone, so the semantics are always 2020-12's.
Error messages always come from ``jsonschema``: they name the field.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import fastjsonschema
import jsonschema

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


def _portable(schema: Any) -> bool:
    if isinstance(schema, bool):
        return True
    if not isinstance(schema, Mapping) or not _PORTABLE.issuperset(schema):
        return False
    if isinstance(schema.get("items"), list):
        return False
    subs: list[Any] = list(schema.get("properties", {}).values())
    for key in ("additionalProperties", "not", "items"):
        if isinstance(schema.get(key), (Mapping, bool)):
            subs.append(schema[key])
    for key in _SCHEMA_LISTS:
        subs.extend(schema.get(key, ()))
    return all(_portable(s) for s in subs)


class CompiledSchema:
    """One schema: a fast ``is_valid`` and field-naming ``errors``."""

    __slots__ = ("is_valid", "schema", "validator")

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self.validator = jsonschema.Draft202012Validator(schema)
        self.is_valid: Callable[[Any], bool] = self.validator.is_valid
        if _portable(schema):
            compiled = fastjsonschema.compile(dict(schema), use_default=False, use_formats=False)
            self.is_valid = _boolean(compiled)

    def errors(self, value: Any, what: str = "argument") -> list[str]:
        if self.is_valid(value):
            return []
        out = []
        for error in sorted(self.validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
            field = ".".join(str(p) for p in error.absolute_path)
            out.append(f"{what} {field}: {error.message}" if field else f"{what}s: {error.message}")
        return out


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
