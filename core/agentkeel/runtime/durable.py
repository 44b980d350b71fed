"""Durable runs from the journal: taking a run over, resolving in-doubt steps, and
rebuilding a run's steps and duration for ``show`` and rollback."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs

from agentkeel.errors import AgentkeelError
from agentkeel.journal.base import Journal, RunState, StepRecord
from agentkeel.runtime.executor import step_result_from_record
from agentkeel.runtime.lease import HeldLease
from agentkeel.types import Plan, PlanRevision, RunStatus, StepResult, StepStatus

if TYPE_CHECKING:
    from agentkeel.tools.registry import ToolRegistry

RESUMABLE = frozenset({RunStatus.RUNNING.value, RunStatus.WAITING.value, RunStatus.IN_DOUBT.value,
                       RunStatus.ROLLING_BACK.value})


def take(journal: Journal, tools: ToolRegistry, run_id: str, owner: str, ttl_s: float) -> tuple[HeldLease, RunState]:
    """Lease a journaled run for this process; the state is read after the lease is held.

    Raises ``LeaseHeldError`` while another live process holds it, and
    ``AgentkeelError`` (with the lease released) when a tool the run needs is missing.
    """
    from agentkeel.planner.plan import plan_from_dict

    held = HeldLease(journal, journal.acquire(run_id, owner, ttl_s), ttl_s)
    with contextlib.ExitStack() as on_error:
        on_error.enter_context(held)  # released if anything below raises
        state = journal.load(run_id)  # what the previous holder wrote before losing the lease
        plan = plan_from_dict(state.run.plan)
        needed = {s.tool_name for s in plan.steps} | {r.tool_name for r in state.steps}
        needed |= {spec.rollback for name in needed if (spec := tools.get(name)) and spec.rollback}
        missing = sorted(name for name in needed if name not in tools)
        if missing:
            raise AgentkeelError(
                f"run {run_id} needs tools that no loaded plugin provides: {', '.join(missing)}; install or "
                "enable the plugins that register them (see `agentkeel tools`), then try again"
            )
        on_error.pop_all()  # the caller holds it now
    return held, state


def resolve(held: HeldLease, state: RunState, resolutions: dict[int, bool]) -> list[StepRecord]:
    """Record an operator's word on in-doubt steps: ``True`` it happened, ``False`` it did not."""
    written = []
    for step_id, happened in resolutions.items():
        intent, outcome = state.forward(step_id)
        if intent is None or outcome is not None:
            raise AgentkeelError(f"step {step_id} of run {state.run.run_id} is not in doubt; nothing to resolve")
        status = StepStatus.SUCCEEDED if happened else StepStatus.PENDING
        note = "it happened" if happened else "it did not happen; run it again"
        record = StepRecord(step_id, "forward", "outcome", intent.tool_name, intent.args, intent.idempotency_key,
                            status.value, None, f"resolved by an operator: {note}")
        held.outcome(record)
        written.append(record)
    return written


def revisions_of(state: RunState) -> list[PlanRevision]:
    """The run's plan revisions, oldest first (at least one for a run with a plan)."""
    from agentkeel.planner.plan import plan_from_dict

    records = state.revisions
    if not records:
        return [PlanRevision(1, "initial", plan_from_dict(state.run.plan), state.run.planning_cost_usd)]
    return [PlanRevision(r.revision, r.reason, plan_from_dict(r.plan), r.planning_cost_usd) for r in records]


def steps_from_journal(plans: Plan | Sequence[Plan], state: RunState) -> list[StepResult]:
    """Each step of every plan revision as the journal last recorded it: pending when
    never run, skipped when a later revision replaced it before it ran."""
    plans = [plans] if isinstance(plans, Plan) else list(plans)
    out = []
    seen: set[int] = set()
    for number, plan in enumerate(plans, start=1):
        superseded = number < len(plans)
        for step in plan.steps:
            if step.step_id in seen:
                continue
            seen.add(step.step_id)
            intent, outcome = state.forward(step.step_id)
            if outcome is not None:
                result = step_result_from_record(outcome)
                _, undo = state.compensation(step.step_id)
                if undo is not None and undo.status == StepStatus.SUCCEEDED.value:
                    result = attrs.evolve(result, status=StepStatus.COMPENSATED)
            elif intent is not None:
                result = StepResult(step.step_id, intent.tool_name, StepStatus.RUNNING, intent.args,
                                    error="started; no outcome recorded")
            elif superseded:
                result = StepResult(step.step_id, step.tool_name, StepStatus.SKIPPED, step.tool_args,
                                    error=f"not run: replaced by plan revision {number + 1}")
            else:
                result = StepResult(step.step_id, step.tool_name, StepStatus.PENDING, step.tool_args)
            out.append(result)
    return out


def run_duration(state: RunState) -> float:
    """How long the run itself took: from its creation to its last step record (not to
    the last status change, which a later ``rollback`` or ``show`` must not stretch)."""
    record = state.run
    last = max((s.ts for s in state.steps if s.kind == "forward"), default=record.created_at)
    return max(0.0, last - record.created_at)
