"""Rollback by compensation.

When a run aborts (or on ``agentkeel rollback``), every step that took effect
(it succeeded, or its result was rejected after the tool ran) and whose tool
names a ``rollback`` tool is compensated, in the reverse of the order the steps
finished (with steps run one at a time: last step first; a step a crash
interrupted, first of all). The compensator gets
the step's original arguments merged with its result (arguments win), keeping
only the parameters it declares, plus the forward step's idempotency key when it
takes one, so a compensator can find the effect it undoes and running it twice
is harmless. Compensating calls go through the same ``StepRunner`` as forward
steps: permissions, the tool router (breaker, rate limit, journal intent,
sandbox), the evaluator and the ``agentkeel_recover`` hook. Each compensation is
journaled (intent, then outcome), so a rollback interrupted by a crash
continues on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.journal.base import RunState
from agentkeel.logs import STEP_ID
from agentkeel.runtime.executor import StepRunner, outcome_record, took_effect
from agentkeel.types import PlanStep, StepResult, StepStatus, ToolSpec

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.runtime.lease import HeldLease


def compensation_args(compensator: ToolSpec, args: Mapping[str, Any], result: Any) -> dict[str, Any]:
    """The compensator's arguments: the forward result's fields, overridden by the
    forward arguments, restricted to what the compensator declares when its schema
    forbids other properties; never the idempotency key (the router adds it)."""
    merged: dict[str, Any] = {**result, **args} if isinstance(result, Mapping) else dict(args)
    schema = compensator.args_schema
    if schema.get("additionalProperties", True) is False:
        declared = schema.get("properties", {})
        merged = {k: v for k, v in merged.items() if k in declared}
    merged.pop("idempotency_key", None)
    return merged


def completion_order(state: RunState | None) -> list[int]:
    """Forward step ids in the order their first outcomes were journaled."""
    if state is None:
        return []
    return list(dict.fromkeys(r.step_id for r in state.steps if r.kind == "forward" and r.phase == "outcome"))


@attrs.define
class CompensationReport:
    """What a compensation pass did: the steps with their new status, the steps it
    compensated now or earlier, what it could not undo, and steps with no rollback tool."""

    steps: list[StepResult]
    compensated: list[int] = attrs.field(factory=list)
    problems: list[str] = attrs.field(factory=list)
    not_undoable: list[int] = attrs.field(factory=list)

    def describe(self) -> str:
        parts = []
        if self.compensated:
            parts.append("rolled back step(s) " + ", ".join(map(str, self.compensated)))
        if self.problems:
            parts.append("rollback incomplete: " + "; ".join(self.problems))
        if self.not_undoable:
            parts.append("no rollback tool for step(s) " + ", ".join(map(str, self.not_undoable))
                         + ": their effects, if any, stay")
        return "; ".join(parts)


@attrs.define
class Compensation:
    runner: StepRunner
    run: RunContext
    lease: HeldLease
    state: RunState | None = None
    order: Sequence[int] | None = None
    """Forward step ids in the order they finished (default: as journaled in ``state``, else by id)."""

    async def compensate(self, steps: list[StepResult]) -> CompensationReport:
        """Compensate the steps of ``steps`` that took effect, the last to finish first.

        A step interrupted by a crash (status ``running``, from the journal) is
        compensated too when its tool takes the idempotency key: its compensator
        gets the same key and can find, or not find, the effect to undo."""
        with self.run.span("compensate", steps=len(steps)) as span:
            report = await self._compensate(steps)
            span.set(compensated=len(report.compensated), problems=len(report.problems))
        return report

    async def _compensate(self, steps: list[StepResult]) -> CompensationReport:
        report = CompensationReport(list(steps))
        by_id = {s.step_id: s for s in steps}
        tools = self.runner.tools
        order = self.order if self.order is not None else completion_order(self.state)
        rank = {step_id: index for index, step_id in enumerate(order)}
        unfinished = len(rank)  # a step no outcome names (a crash interrupted it) finished last
        for step in sorted(steps, key=lambda s: (rank.get(s.step_id, unfinished), s.step_id), reverse=True):
            if not (took_effect(step) or step.status is StepStatus.RUNNING):
                continue
            where = f"step {step.step_id} ({step.tool_name})"
            spec = tools.get(step.tool_name)
            if spec is None:
                report.problems.append(f"{where} left uncompensated: no loaded plugin provides {step.tool_name}")
                continue
            if spec.rollback is None:
                if step.status is not StepStatus.RUNNING and not spec.idempotent:
                    report.not_undoable.append(step.step_id)  # idempotent ones are mostly reads: not listed
                continue
            if step.status is StepStatus.RUNNING and not spec.accepts_key:
                # Interrupted by a crash: its effect is unknown, and without the key its
                # compensator cannot find out. Compensating a maybe-effect is not safe.
                report.problems.append(
                    f"{where} was interrupted and its effect is unknown; {spec.name} takes no idempotency "
                    f"key, so {spec.rollback} cannot tell whether there is anything to undo: check by hand"
                )
                continue
            problem = await self._compensate_one(step, spec, tools[spec.rollback])
            if problem is None:
                by_id[step.step_id] = attrs.evolve(step, status=StepStatus.COMPENSATED)
                report.compensated.append(step.step_id)
            else:
                report.problems.append(problem)
        report.not_undoable.sort()
        report.steps = [by_id[s.step_id] for s in steps]
        return report

    async def _compensate_one(self, step: StepResult, spec: ToolSpec, comp: ToolSpec) -> str | None:
        """Undo one step; None when done (now or before a crash), else what went wrong."""
        where = f"step {step.step_id} ({spec.name})"
        if self.state is not None:
            intent, outcome = self.state.compensation(step.step_id)
            if outcome is not None and outcome.status == StepStatus.SUCCEEDED.value:
                return None
            if intent is not None and outcome is None and not comp.retry_safe:
                return (f"{where}: its compensation {comp.name} started before a crash and may or may not have "
                        f"run; {comp.name} is not retry-safe, so a human must check it")
        args = compensation_args(comp, step.tool_args, step.result)
        started = perf_counter()
        plan_step = PlanStep(step.step_id, comp.name, args, description=f"compensate step {step.step_id}")
        token = STEP_ID.set(step.step_id)
        try:
            with self.run.span("step", step_id=step.step_id, tool=comp.name, call_kind="compensation",
                               compensates=spec.name) as span:
                result, _ = await self.runner.run_call(self.run, plan_step, comp, args, kind="compensation",
                                                       lease=self.lease, validate=True, started=started)
                span.set(status=result.status.value, attempts=result.attempts, step_error=result.error or "")
        finally:
            STEP_ID.reset(token)
        if result.status is StepStatus.IN_DOUBT:
            # Not journaled as an outcome: a resume then sees a compensation that started and never
            # finished, and asks a human instead of running a compensator that is not retry-safe again.
            return (f"{where}: its compensation {comp.name} was given up at its timeout and may or may not "
                    f"have run; {comp.name} is not retry-safe, so a human must check it")
        ran = self.runner.tools.get(result.tool_name)
        self.lease.outcome(outcome_record(self.run.run_id, step.step_id, "compensation", result),
                           defer=ran is not None and ran.retry_safe)
        self.run.emit("step_compensated", step_id=step.step_id, tool=comp.name, status=result.status.value,
                      error=result.error)
        if result.status is StepStatus.SUCCEEDED:
            return None
        return f"{where} left uncompensated: {comp.name} {result.status.value}: {result.error}"
