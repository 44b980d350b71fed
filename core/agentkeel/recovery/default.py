"""The default recovery handler.

Retry only tools that are idempotent or take the idempotency key, with
exponential backoff and full jitter; then the declared fallback tool; otherwise
replan ("try a different approach": the planner is asked again with the results
so far and the failure) while ``[recovery] max_replans`` (default 1) is above 0,
else fail the step. A non-idempotent tool is never retried. Compensations are
never replanned (the host ignores "replan" for them). The host counts the
replans of a run and fails the step once they are used up.
"""

from __future__ import annotations

import random

from agentkeel.context import RunContext
from agentkeel.markers import hookimpl
from agentkeel.types import PlanStep, RecoveryDecision, ToolSpec


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**(attempt-1))]."""
    return random.uniform(0.0, min(max_s, base_s * (2 ** (attempt - 1))))


@hookimpl(trylast=True)
def agentkeel_recover(
    step: PlanStep, tool: ToolSpec, error: str, attempt: int, retryable: bool, run: RunContext
) -> RecoveryDecision:
    config = run.config
    if tool.retry_safe and retryable and attempt < config.max_attempts:
        return RecoveryDecision(
            "retry",
            f"attempt {attempt} failed; {tool.name} is retry-safe",
            delay_s=backoff_delay(attempt, config.base_delay_s, config.max_delay_s),
        )
    if tool.fallback:
        return RecoveryDecision("fallback", f"{tool.name} failed; trying its fallback", fallback_tool=tool.fallback)
    action = "replan" if config.max_replans > 0 and not step.optional else "fail"
    if not tool.retry_safe:
        return RecoveryDecision(action, f"{tool.name} is not idempotent and takes no idempotency key: not retried")
    return RecoveryDecision(action, f"{tool.name} failed after {attempt} attempt(s)")
