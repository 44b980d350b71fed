"""Events of a run as JSON, numbered for Server-Sent Events.

A run's events (``agentkeel.types.Event``) carry attrs records (the plan, a step's
result, the response); ``event_data`` turns them into JSON values once, when the
event happens, so every client that follows the run gets the same bytes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import attrs

from agentkeel.types import Event

MAX_DEPTH = 32


def json_value(value: Any, depth: int = 0) -> Any:
    """``value`` as a JSON value: records through their ``to_dict``, attrs classes field by
    field, mappings and sequences element by element; anything else as its ``str``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > MAX_DEPTH:
        return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return json_value(to_dict(), depth + 1)
    if attrs.has(type(value)):
        return {f.name: json_value(getattr(value, f.name), depth + 1) for f in attrs.fields(type(value))
                if f.repr is not False}
    if isinstance(value, Mapping):
        return {str(k): json_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_value(v, depth + 1) for v in value]
    if hasattr(value, "value") and isinstance(value.value, (str, int)):  # an enum member
        return value.value
    return str(value)


def event_data(event: Event) -> dict[str, Any]:
    """The JSON body of one event: its kind, run id and data."""
    data = json_value(event.data)
    return {"kind": event.kind, "run_id": event.run_id, "data": data if isinstance(data, dict) else {}}


@attrs.frozen
class NumberedEvent:
    """One event of a run as the stream sends it: ``id`` counts from 1 per run."""

    id: int
    kind: str
    body: str
    """The JSON text of ``event_data``."""

    def sse(self) -> bytes:
        """The event in the Server-Sent Events wire format."""
        return f"id: {self.id}\nevent: {self.kind}\ndata: {self.body}\n\n".encode()


def numbered(number: int, event: Event) -> NumberedEvent:
    body = json.dumps(event_data(event), separators=(",", ":"), ensure_ascii=False)
    return NumberedEvent(number, event.kind, body)
