"""Compact, size-capped text of what a run's steps returned: the facts an answer,
a memory or a prompt can carry without the whole results.

A leaf: used by the deterministic responder and the memory manager.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from agentkeel.types import StepResult, StepStatus

MAX_VALUE_CHARS = 200
MAX_FIELDS = 12


def value_text(value: Any, max_chars: int = MAX_VALUE_CHARS) -> str:
    """One value as short, single-line text: booleans as yes/no, numbers plainly, the rest as JSON."""
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, int):
        text = str(value)
    elif isinstance(value, float):
        text = f"{value:.2f}" if value != int(value) else str(int(value))
    elif isinstance(value, str):
        text = " ".join(value.split())  # no newlines or tabs: one line per value
    elif value is None:
        text = "none"
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def fact(step: StepResult) -> str | None:
    """``lookup_order(order_id=1003): status shipped, total 120`` for a step that succeeded, else None."""
    if step.status is not StepStatus.SUCCEEDED:
        return None
    args = ", ".join(f"{k}={value_text(v, 60)}" for k, v in list(step.tool_args.items())[:4]
                     if k != "idempotency_key")
    result = step.result
    if isinstance(result, Mapping):
        fields = [f"{k} {value_text(v)}" for k, v in list(result.items())[:MAX_FIELDS]]
        shown = ", ".join(fields) if fields else "nothing"
    else:
        shown = value_text(result)
    return f"{step.tool_name}({args}): {shown}"


def facts(steps: Iterable[StepResult], max_chars: int = 2000, max_items: int = 20) -> list[str]:
    """The facts of the steps that succeeded, in order: at most ``max_items`` of them and
    ``max_chars`` in all (so the cost stays flat however many steps a run had)."""
    out: list[str] = []
    used = 0
    for step in steps:
        if step.status is not StepStatus.SUCCEEDED:
            continue
        if len(out) == max_items:
            out.append("… (more results left out)")
            break
        line = fact(step)
        if line is None:
            continue
        if used + len(line) > max_chars:
            out.append("… (more results left out)")
            break
        out.append(line)
        used += len(line)
    return out
