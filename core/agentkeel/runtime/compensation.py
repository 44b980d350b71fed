"""Rollback by compensation.

When a run aborts (or on ``agentkeel rollback``), every completed step whose
tool names a ``rollback`` tool is compensated, last step first. The compensator
gets the step's original arguments merged with its result (arguments win),
keeping only the parameters it declares, plus the forward step's idempotency
key when it takes one, so a compensator can find the effect it undoes and
running it twice is harmless. Each compensation is journaled (intent, then
outcome), so a rollback interrupted by a crash continues on resume.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.recovery.default import backoff_delay
from agentkeel.errors import SandboxError, ToolError
from agentkeel.journal.base import Lease, RunState, StepRecord
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.types import StepResult, StepStatus, ToolSpec
from agentkeel.tools.validation import args_errors

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.journal.base import Journal
    from agentkeel.runtime.system import AgentSystem


def compensation_args(compensator: ToolSpec, args: Mapping[str, Any], result: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {**result, **args} if isinstance(result, Mapping) else dict(args)
    schema = compensator.args_schema
    if schema.get("additionalProperties", True) is False:
        declared = schema.get("properties", {})
        merged = {k: v for k, v in merged.items() if k in declared}
    merged.pop("idempotency_key", None)
    return merged


@attrs.define
class Rollback:
    system: AgentSystem
    run: RunContext
    journal: Journal
    lease: Lease
    state: RunState | None = None
    problems: list[str] = attrs.field(factory=list)

    async def compensate(self, steps: list[StepResult]) -> list[StepResult]:
        """Compensate the completed steps of ``steps``; returns the steps with their new status.

        A step interrupted by a crash (status ``running``, from the journal) is
        compensated too when its tool takes the idempotency key: its compensator
        gets the same key and can find, or not find, the effect to undo."""
        by_id = {s.step_id: s for s in steps}
        for step in sorted(steps, key=lambda s: s.step_id, reverse=True):
            if step.status not in (StepStatus.SUCCEEDED, StepStatus.RUNNING):
                continue
            where = f"step {step.step_id} ({step.tool_name})"
            spec = self.system.tools.get(step.tool_name)
            if spec is None:
                self.problems.append(f"{where} left uncompensated: no loaded plugin provides {step.tool_name}")
                continue
            if spec.rollback is None:
                continue
            if step.status is StepStatus.RUNNING and not spec.accepts_key:
                # Interrupted by a crash: its effect is unknown, and without the key its
                # compensator cannot find out. Compensating a maybe-effect is not safe.
                self.problems.append(
                    f"{where} was interrupted and its effect is unknown; {spec.name} takes no idempotency "
                    f"key, so {spec.rollback} cannot tell whether there is anything to undo: check by hand"
                )
                continue
            if await self._compensate_one(step, spec, self.system.tools[spec.rollback]):
                by_id[step.step_id] = attrs.evolve(step, status=StepStatus.COMPENSATED)
        return [by_id[s.step_id] for s in steps]

    async def _compensate_one(self, step: StepResult, spec: ToolSpec, comp: ToolSpec) -> bool:
        where = f"step {step.step_id} ({spec.name})"
        if self.state is not None:
            intent, outcome = self.state.compensation(step.step_id)
            if outcome is not None and outcome.status == StepStatus.SUCCEEDED.value:
                return True
            if intent is not None and outcome is None and not comp.retry_safe:
                self.problems.append(
                    f"{where}: its compensation {comp.name} started before a crash and may or may not have "
                    f"run; {comp.name} is not retry-safe, so a human must check it"
                )
                return False
        key = f"{self.run.run_id}:{step.step_id}"
        args = compensation_args(comp, step.tool_args, step.result)
        problems = args_errors(comp, args)
        if problems:
            self.problems.append(f"{where} left uncompensated: {comp.name} arguments: {'; '.join(problems)}")
            return False
        decision = self.system.plugins.authorize(self.run.principal, comp, args)
        self.system.audit_decision(self.run, comp.name, decision, args)
        if not decision.allowed:
            self.problems.append(f"{where} left uncompensated: {decision.reason}")
            return False
        call_args = {**args, "idempotency_key": key} if comp.accepts_key else args
        started = perf_counter()
        attempt = 0
        error: str | None = None
        result: Any = None
        self.journal.intent(self.lease, StepRecord(step.step_id, "compensation", "intent", comp.name, args, key))
        while True:
            attempt += 1
            try:
                result = await self.system.sandboxes[comp.isolation].run(
                    ToolCall(comp, call_args, comp.timeout, self.run.run_id, step.step_id)
                )
                error = None
                break
            except (ToolError, SandboxError) as exc:
                error = str(exc)
                retryable = isinstance(exc, ToolError) and exc.retryable
                if not (comp.retry_safe and retryable and attempt < self.system.config.max_attempts):
                    break
                await asyncio.sleep(
                    backoff_delay(attempt, self.system.config.base_delay_s, self.system.config.max_delay_s)
                )
        status = StepStatus.FAILED if error else StepStatus.SUCCEEDED
        self.journal.outcome(
            self.lease,
            StepRecord(step.step_id, "compensation", "outcome", comp.name, args, key, status.value, result,
                       error, perf_counter() - started, 0.0, attempt),
        )
        self.system.plugins.event("step_compensated", self.run.run_id, step_id=step.step_id, tool=comp.name,
                                  error=error)
        if error:
            self.problems.append(f"{where} left uncompensated: {comp.name} failed: {error}")
            return False
        return True
