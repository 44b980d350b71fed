"""The default evaluator: the tool's output schema, the step's expectations, reported errors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentkeel.markers import hookimpl
from agentkeel.tools.validation import schema_errors
from agentkeel.types import PlanStep, ToolSpec, Verdict


@hookimpl(trylast=True)
def agentkeel_evaluate(step: PlanStep, tool: ToolSpec, result: Any) -> Verdict | None:
    problems: list[str] = []
    if isinstance(result, Mapping) and result.get("error"):
        problems.append(f"tool reported an error: {result['error']}")
    if tool.output_schema is not None:
        problems += schema_errors(tool.output_schema, result, "output schema: field")
    if step.expect is not None:
        problems += schema_errors(step.expect, result, "expectation: field")
    if problems:
        return Verdict(False, 0.0, "; ".join(problems))
    return None
