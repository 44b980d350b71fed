"""JSON Schema patterns as ECMA-262 regular expressions, with one engine everywhere.

JSON Schema defines ``pattern`` (and the names in ``patternProperties``) as
ECMA-262 regular expressions built with the ``u`` flag. Python's ``re`` is
another dialect: its ``$`` also matches before a trailing newline (so
``^[a-z]+@example\\.com$`` accepts ``"bob@example.com\\n"``), its ``\\d`` and
``\\w`` match any Unicode digit or letter, and it accepts syntax ECMA-262 does
not have (``(?P<name>...)``, inline flags, ``\\Z``). ``jsonschema`` and
``fastjsonschema`` both evaluate patterns with ``re``, so every place agentkeel
evaluates a JSON Schema comes here instead, and its patterns run on ``regress``
(a Rust ECMA-262 engine):

- ``Validator``: ``jsonschema``'s 2020-12 validator whose ``pattern``,
  ``patternProperties``, ``additionalProperties`` and ``unevaluatedProperties``
  match with ``regress``, and which stays this class inside subschemas.
- ``check_schema``: the metaschema check, with the ``regex`` format checked by
  ``regress``; the error names the field (``properties.to.pattern: ...``).
- ``pattern_problems``: only the invalid patterns of a schema, for code that
  must not fail on other metaschema quirks.
- ``ecma_regex``: one compiled pattern, for compiled fast paths.

``regress`` backtracks, as ``re`` does: these patterns are written by tool
authors and operators. Patterns matched against free text from a user (the
rule planner's templates) use RE2 instead (``agentkeel.planner.plan``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import regress
from jsonschema.exceptions import SchemaError, ValidationError, best_match

FLAGS = "u"
"""ECMA-262 flags every JSON Schema pattern is built with (the spec asks for Unicode mode)."""


class PatternError(ValueError):
    """A pattern that is not an ECMA-262 regular expression."""


@functools.lru_cache(maxsize=4096)
def ecma_regex(pattern: str) -> regress.Regex:
    """``pattern`` compiled as an ECMA-262 regular expression (``u`` flag). Raises ``PatternError``."""
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern must be a string, got {pattern!r}")
    try:
        return regress.Regex(pattern, FLAGS)
    except regress.RegressError as exc:
        raise PatternError(
            f"{pattern!r} is not an ECMA-262 regular expression: {exc} (JSON Schema patterns are ECMA-262 in "
            f"Unicode mode, not Python re: no (?P<name>...), inline flags, \\Z, or escapes of plain characters "
            f"such as \\- outside [...])"
        ) from None


def search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``text``, as JSON Schema's ``pattern`` means it."""
    return ecma_regex(pattern).find(text) is not None


# --- the keywords that evaluate patterns ------------------------------------------
# jsonschema 4.x keyword functions, with ``re.search`` replaced by ``regress``.


def _pattern(validator: Any, patrn: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and ecma_regex(patrn).find(instance) is None:
        yield ValidationError(f"{instance!r} does not match {patrn!r}")


def _pattern_properties(validator: Any, properties: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for patrn, subschema in properties.items():
        regex = ecma_regex(patrn)
        for key, value in instance.items():
            if regex.find(key) is not None:
                yield from validator.descend(value, subschema, path=key, schema_path=patrn)


def _matches_a_pattern(schema: Any, key: str) -> bool:
    return any(ecma_regex(p).find(key) is not None for p in schema.get("patternProperties", {}))


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    extras = {key for key in instance if key not in properties and not _matches_a_pattern(schema, key)}
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")
        else:
            yield ValidationError(f"Additional properties are not allowed ({_extras(sorted(extras, key=str))})")


def _extras(extras: list[Any]) -> str:
    return ", ".join(repr(e) for e in extras) + (" was" if len(extras) == 1 else " were") + " unexpected"


def _unevaluated_properties(validator: Any, unevaluated: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    invalid = [
        key for key in instance
        if key not in evaluated
        and next(validator.descend(instance[key], unevaluated, path=key, schema_path=key), None) is not None
    ]
    if invalid:
        if unevaluated is False:
            yield ValidationError(f"Unevaluated properties are not allowed ({_extras(sorted(invalid, key=str))})")
        else:
            listed = ", ".join(repr(e) for e in invalid) + (" was" if len(invalid) == 1 else " were")
            yield ValidationError(f"Unevaluated properties are not valid under the given schema ({listed} "
                                  f"unevaluated and invalid)")


def _valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _evaluated_keys(validator: Any, instance: Any, schema: Any) -> list[Any]:
    """The keys of ``instance`` that ``schema`` evaluates (jsonschema's
    ``find_evaluated_property_keys_by_schema``, with patterns matched by ``regress``)."""
    if validator.is_type(schema, "boolean"):
        return []
    keys: list[Any] = []
    for keyword in ("$ref", "$dynamicRef"):
        ref = schema.get(keyword)
        if ref is not None:
            resolved = validator._resolver.lookup(ref)
            keys += _evaluated_keys(validator.evolve(schema=resolved.contents, _resolver=resolved.resolver),
                                    instance, resolved.contents)
    properties = schema.get("properties")
    if validator.is_type(properties, "object"):
        keys += properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        subschema = schema.get(keyword)
        if subschema is not None:
            keys += (key for key, value in instance.items() if _valid(validator.descend(value, subschema)))
    if "patternProperties" in schema:
        keys += (key for key in instance if _matches_a_pattern(schema, key))
    for name, subschema in schema.get("dependentSchemas", {}).items():
        if name in instance:
            keys += _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword, []):
            if _valid(validator.descend(instance, subschema)):
                keys += _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys += _evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                keys += _evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            keys += _evaluated_keys(validator, instance, schema["else"])
    return keys


def _is_ecma_regex(instance: object) -> bool:
    if isinstance(instance, str):
        ecma_regex(instance)
    return True


FORMAT_CHECKER = jsonschema.FormatChecker(())
"""The 2020-12 format checks, with ``regex`` meaning ECMA-262 (as checked by ``regress``)."""
FORMAT_CHECKER.checkers.update(jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers)
FORMAT_CHECKER.checks("regex", raises=PatternError)(_is_ecma_regex)

Validator: Any = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    {
        "pattern": _pattern,
        "patternProperties": _pattern_properties,
        "additionalProperties": _additional_properties,
        "unevaluatedProperties": _unevaluated_properties,
    },
    format_checker=FORMAT_CHECKER,
)
"""``jsonschema.Draft202012Validator`` with ECMA-262 patterns. Build it as ``Validator(schema)``."""

_EVOLVE_FIELDS = [(f.name, f.alias) for f in Validator.__attrs_attrs__ if f.init]


def _evolve(self: Any, **changes: Any) -> Any:
    # jsonschema's evolve switches to the class a subschema's "$schema" names, which
    # would evaluate the patterns below it with re; every schema here is 2020-12
    # (the root's "$schema" is not consulted either), so the class stays this one.
    changes.setdefault("schema", self.schema)
    for name, alias in _EVOLVE_FIELDS:
        if alias not in changes:
            changes[alias] = getattr(self, name)
    return type(self)(**changes)


Validator.evolve = _evolve

_META = Validator(Validator.META_SCHEMA, format_checker=FORMAT_CHECKER)


def _where(error: ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path)


def _message(error: ValidationError) -> str:
    if error.validator == "format" and error.validator_value == "regex" and error.cause is not None:
        text = str(error.cause)
    else:
        text = error.message
    where = _where(error)
    return f"{where}: {text}" if where else text


def check_schema(schema: Mapping[str, Any] | bool) -> None:
    """Raise ``jsonschema.SchemaError`` when ``schema`` is not a valid 2020-12 schema whose
    patterns are ECMA-262; the message names the field (``properties.to.pattern: ...``)."""
    error = best_match(_META.iter_errors(schema))
    if error is not None:
        raised = SchemaError.create_from(error)
        raised.message = _message(error)
        raise raised


def _has_patterns(node: Any) -> bool:
    if isinstance(node, Mapping):
        return "pattern" in node or "patternProperties" in node or any(_has_patterns(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_patterns(v) for v in node)
    return False


def pattern_problems(schema: Any) -> list[str]:
    """Every pattern in ``schema`` that is not an ECMA-262 regular expression, each naming
    its field; other departures from the metaschema are not reported."""
    if not _has_patterns(schema):
        return []
    return [_message(e) for e in _META.iter_errors(schema) if _is_pattern_error(e)]


def _is_pattern_error(error: ValidationError) -> bool:
    if error.validator == "format":
        return bool(error.validator_value == "regex")
    return error.validator == "type" and list(error.schema_path)[-2:] == ["pattern", "type"]
