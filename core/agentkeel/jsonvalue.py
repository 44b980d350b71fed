"""JSON at the trust boundary: bounded decoding and checks of values that must be JSON.

Everything that crosses a boundary as JSON (tool arguments and results, sandbox
replies, LLM answers, configuration values) goes through here, so one set of
limits holds everywhere:

- no NaN or infinity (JSON has neither; ``float("nan") > 100`` is False, so a
  non-finite number slips past every ``maximum``);
- at most ``MAX_DEPTH`` levels of nesting (deeper values crash recursive code,
  the JSON encoder and schema validators included);
- strings and keys that are valid Unicode text (no lone surrogates, which cannot
  be encoded as UTF-8 and fail later, far from their source);
- object keys that are strings; only ``dict``, ``list``, ``str``, ``int``,
  ``float``, ``bool`` and ``None`` (a ``tuple`` is accepted as an array).

Violations raise ``JSONValueError`` (a ``ValueError``) whose message names the
field (``what`` plus the path: ``"argument amount: NaN is not a JSON number"``).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 64
MAX_BYTES = 16 * 1024 * 1024

_SCALARS = (str, int, float, bool, type(None))

class JSONValueError(ValueError):
    """A value that is not acceptable JSON; the message names the field."""

def _reject_constant(name: str) -> Any:
    raise JSONValueError(f"{name} is not a JSON number")

def loads(data: str | bytes, *, what: str = "value", max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH) -> Any:
    """Decode untrusted JSON text with size, depth, number and text checks."""
    if len(data) > max_bytes:
        raise JSONValueError(f"{what}: {len(data)} bytes of JSON, more than the limit of {max_bytes}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONValueError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        value = json.loads(data)  # NaN and Infinity decode to floats, so check() can name their field
    except RecursionError:
        raise JSONValueError(f"{what}: nested more than {max_depth} levels deep") from None
    except ValueError as exc:
        raise JSONValueError(f"{what}: not JSON: {exc}") from None
    check(value, what=what, max_depth=max_depth)
    return value

def dumps(value: Any, *, what: str = "value") -> str:
    """Compact JSON text of ``value``, which must pass ``check``."""
    check(value, what=what)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

def problem(value: Any, *, max_depth: int = MAX_DEPTH) -> str | None:
    """What makes ``value`` unacceptable JSON (``"<path>: <why>"``, path possibly empty), or None."""
    # Fast path for the common flat case: scalars and containers of scalars.
    kind = type(value)
    if kind is str:
        return _text_problem(value) or None
    if kind in (int, bool) or value is None:
        return None
    if kind is float:
        return None if math.isfinite(value) else f": {_number_name(value)} is not a JSON number"
    stack: list[tuple[Any, int, tuple[Any, ...]]] = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, Mapping):
            if depth > max_depth:
                return f"{_path(path)}: nested more than {max_depth} levels deep"
            for key, item in node.items():
                if type(key) is not str:
                    return f"{_path(path)}: object key {key!r} is not a string"
                if _text_problem(key):
                    return f"{_path(path)}: an object key{_text_problem(key)[1:]}"
                why = _scalar_problem(item)
                if why is None:
                    stack.append((item, depth + 1, (*path, key)))
                elif why:
                    return f"{_path((*path, key))}{why}"
        elif isinstance(node, (list, tuple)):
            if depth > max_depth:
                return f"{_path(path)}: nested more than {max_depth} levels deep"
            for index, item in enumerate(node):
                why = _scalar_problem(item)
                if why is None:
                    stack.append((item, depth + 1, (*path, index)))
                elif why:
                    return f"{_path((*path, index))}{why}"
        else:
            why = _scalar_problem(node)
            if why:
                return f"{_path(path)}{why}"
    return None

def check(value: Any, *, what: str = "value", max_depth: int = MAX_DEPTH) -> None:
    """Raise ``JSONValueError`` naming the field when ``value`` is not acceptable JSON."""
    bad = problem(value, max_depth=max_depth)
    if bad is not None:
        raise JSONValueError(_join(what, bad))

def _join(what: str, bad: str) -> str:
    path, _, why = bad.partition(": ")
    return f"{what} {path}: {why}" if path else f"{what}: {why}"

def _scalar_problem(item: Any) -> str | None:
    """None: a container to descend into; "": fine; else ": why"."""
    kind = type(item)
    if kind is str:
        return _text_problem(item) or ""
    if kind is int or kind is bool or item is None:
        return ""
    if kind is float:
        return "" if math.isfinite(item) else f": {_number_name(item)} is not a JSON number"
    if isinstance(item, (Mapping, list, tuple)):
        return None
    if isinstance(item, _SCALARS):  # subclasses of the JSON scalars (an IntEnum, a str subclass)
        if isinstance(item, float) and not math.isfinite(item):
            return f": {_number_name(item)} is not a JSON number"
        return _text_problem(item) if isinstance(item, str) else ""
    return f": a {type(item).__name__} is not a JSON value"

def _text_problem(text: str) -> str:
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f": contains a lone surrogate (U+{ord(text[exc.start]):04X}) at position {exc.start}, not text"
    return ""

def _number_name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"

def _path(path: tuple[Any, ...]) -> str:
    if len(path) > 8:
        return ".".join(str(p) for p in path[:4]) + ".(...)." + ".".join(str(p) for p in path[-2:])
    return ".".join(str(p) for p in path)

def text_problem(text: str, what: str) -> str | None:
    """A message naming ``what`` when ``text`` is not encodable text, else None."""
    bad = _text_problem(text)
    return f"{what}{bad}" if bad else None


def real_number(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None; a huge int is inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf
