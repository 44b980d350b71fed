"""JSON Schema validation with compiled validators cached per schema object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jsonschema

from agentkeel.types import ToolSpec

# Schemas live as long as their ToolSpec or Plan; the identity check guards against id reuse.
_validators: dict[int, tuple[Mapping[str, Any], jsonschema.Draft202012Validator]] = {}


def validator_for(schema: Mapping[str, Any]) -> jsonschema.Draft202012Validator:
    cached = _validators.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    validator = jsonschema.Draft202012Validator(schema)
    _validators[id(schema)] = (schema, validator)
    return validator


def schema_errors(schema: Mapping[str, Any], value: Any, what: str = "argument") -> list[str]:
    """Every way ``value`` breaks ``schema``, each naming the field."""
    validator = validator_for(schema)
    if validator.is_valid(value):
        return []
    out = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
        field = ".".join(str(p) for p in error.absolute_path)
        out.append(f"{what} {field}: {error.message}" if field else f"{what}s: {error.message}")
    return out


def args_errors(spec: ToolSpec, args: Mapping[str, Any]) -> list[str]:
    return schema_errors(spec.args_schema, args)
