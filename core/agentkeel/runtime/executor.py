"""Executes a checked plan step by step: the per-step path of a request.

For each step: dependencies and condition, references resolved, arguments
validated, permission decided and audited, intent journaled, breaker and rate
limit, the sandbox backend, the evaluator, recovery (retry only when
retry-safe, then the fallback tool, else fail), and the outcome journaled
before the next step starts. A step that fails or is denied aborts the run:
later steps do not run and completed steps are compensated (``rollback.py``).

On resume, steps with a journaled outcome are not run again; a step found
started but not finished is re-run only when its tool is retry-safe, otherwise
the run stops ``in_doubt``.

This is the path benchmarked in ``bench/overhead.py``; keep it lean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from agentkeel.errors import BudgetExceededError, SandboxError, ToolError
from agentkeel.journal.base import Lease, RunState, StepRecord
from agentkeel.planner.plan import RefError, evaluate_condition, resolve_args
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.types import (
    CostRecord,
    PlanStep,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
    Verdict,
)
from agentkeel.tools.validation import args_errors

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.journal.base import Journal
    from agentkeel.runtime.system import AgentSystem
    from agentkeel.types import Plan

ABORTING = (StepStatus.FAILED, StepStatus.DENIED)


class StepFailure(Exception):
    """One attempt of a step failed; carries whether trying again could help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class PlanExecutor:
    """Runs the steps of one plan for one run, journaling as it goes."""

    def __init__(
        self,
        system: AgentSystem,
        run: RunContext,
        journal: Journal,
        lease: Lease,
        state: RunState | None = None,
    ) -> None:
        self.system = system
        self.run = run
        self.journal = journal
        self.lease = lease
        self.state = state
        self.results: dict[int, Any] = {}
        self.outcomes: dict[int, StepResult] = {}
        self.budget_exhausted = False
        self.condition_skipped: set[int] = set()
        self.status = RunStatus.SUCCEEDED
        self.detail = ""
        self._ttl = system.lease_ttl_s

    async def execute(self, plan: Plan) -> list[StepResult]:
        """Run (or resume) every step; sets ``status`` and ``detail``."""
        out: list[StepResult] = []
        stopped_at: PlanStep | None = None
        for step in plan.steps:
            result = self._recorded(step)
            if result is None:
                if self.state is not None and self._in_doubt(step):
                    out.append(self.outcomes[step.step_id])
                    stopped_at = step
                    break
                self._keep_lease()
                result = await self.execute_step(step)
                if result.status is StepStatus.WAITING:
                    self.status = RunStatus.WAITING
                    self.detail = f"step {step.step_id} ({step.tool_name}) is waiting: {result.error}"
                    out.append(result)
                    stopped_at = step
                    break
                self._journal_outcome(step, result)
                self.system.plugins.event("step_finished", self.run.run_id, step=result)
            self.outcomes[step.step_id] = result
            if result.status is StepStatus.SUCCEEDED:
                self.results[step.step_id] = result.result
            out.append(result)
            if result.status in ABORTING or self.budget_exhausted:
                self.status = (
                    RunStatus.BUDGET_EXHAUSTED if self.budget_exhausted
                    else RunStatus.DENIED if result.status is StepStatus.DENIED
                    else RunStatus.FAILED
                )
                self.detail = f"step {step.step_id} ({result.tool_name}) {result.status.value}: {result.error}"
                stopped_at = step
                break
        if stopped_at is not None:
            paused = self.status is RunStatus.WAITING
            reason = "run paused" if paused else "run stopped"
            status = StepStatus.PENDING if paused else StepStatus.SKIPPED
            for step in plan.steps:
                if step.step_id > stopped_at.step_id and step.step_id not in self.outcomes:
                    out.append(StepResult(step.step_id, step.tool_name, status, step.tool_args,
                                          error=f"not run: {reason} at step {stopped_at.step_id}"))
        return out

    # --- resume -----------------------------------------------------------------

    def _recorded(self, step: PlanStep) -> StepResult | None:
        """The journaled outcome of ``step`` from an earlier attempt at this run, if any."""
        if self.state is None:
            return None
        _, outcome = self.state.forward(step.step_id)
        if outcome is None or outcome.status == StepStatus.PENDING.value:
            return None  # never finished, or an operator said its effect did not happen
        status = StepStatus(outcome.status)
        if status is StepStatus.SKIPPED and outcome.error == "condition not met":
            self.condition_skipped.add(step.step_id)
        return step_result_from_record(outcome)

    def _in_doubt(self, step: PlanStep) -> bool:
        """A step started but not finished by a crashed process: may it run again?"""
        assert self.state is not None
        intent, outcome = self.state.forward(step.step_id)
        if intent is None or outcome is not None:
            return False
        spec = self.system.tools.get(intent.tool_name)
        if spec is not None and spec.retry_safe:
            return False  # re-run: idempotent, or it gets the same idempotency key again
        self.status = RunStatus.IN_DOUBT
        self.detail = (
            f"step {step.step_id} ({intent.tool_name}) started but its outcome was never recorded, and "
            f"{intent.tool_name} is neither idempotent nor takes an idempotency key, so it was not run again. "
            f"A human must check whether {intent.tool_name} took effect for arguments "
            f"{dict(intent.args)} (idempotency key {intent.idempotency_key}), then run "
            f"`agentkeel resume {self.run.run_id} --resolve {step.step_id}=done` (it happened) or "
            f"`--resolve {step.step_id}=not-done` (run it again)."
        )
        self.outcomes[step.step_id] = StepResult(step.step_id, intent.tool_name, StepStatus.IN_DOUBT,
                                                 intent.args, error=self.detail)
        return True

    # --- one step ---------------------------------------------------------------

    async def execute_step(self, step: PlanStep) -> StepResult:
        system = self.system
        run = self.run
        started = perf_counter()
        for dep in step.depends_on:
            dep_result = self.outcomes.get(dep)
            if dep_result is None or dep_result.status is not StepStatus.SUCCEEDED:
                if dep in self.condition_skipped:
                    self.condition_skipped.add(step.step_id)
                    return self._finish(step, StepStatus.SKIPPED, started, error=f"step {dep} was skipped")
                status = dep_result.status.value if dep_result else "did not run"
                return self._finish(step, StepStatus.SKIPPED, started, error=f"depends on step {dep}, which {status}")
        try:
            if step.when is not None and not evaluate_condition(step.when, self.results):
                self.condition_skipped.add(step.step_id)
                return self._finish(step, StepStatus.SKIPPED, started, error="condition not met")
            args = resolve_args(step.tool_args, self.results) if step.arg_refs else step.tool_args
        except RefError as exc:
            return self._finish(step, StepStatus.FAILED, started, error=str(exc))

        spec = system.tools[step.tool_name]
        # The plan check validated arguments that hold no references; the rest,
        # and any fallback tool's arguments, are validated here.
        must_validate = bool(step.arg_refs)
        attempt = 0
        while True:
            if must_validate:
                problems = args_errors(spec, args)
                if problems:
                    return self._finish(step, StepStatus.FAILED, started, args=args, tool=spec.name,
                                        error="; ".join(problems))
                must_validate = False
            decision = system.plugins.authorize(run.principal, spec, args)
            system.audit_decision(run, spec.name, decision, args)
            if not decision.allowed:
                status = StepStatus.WAITING if decision.wait else StepStatus.DENIED
                return self._finish(step, status, started, args=args, tool=spec.name, error=decision.reason)
            attempt += 1
            try:
                result, cost = await self._attempt(step, spec, args)
                verdict = system.plugins.evaluate(step, spec, result)
                if not verdict.passed:
                    raise StepFailure(f"evaluator rejected the result: {verdict.reason}", retryable=True)
            except BudgetExceededError as exc:
                self.budget_exhausted = True
                return self._finish(step, StepStatus.FAILED, started, args=args, error=str(exc), attempts=attempt)
            except StepFailure as failure:
                recovery = system.plugins.recover(step, spec, str(failure), attempt, failure.retryable, run)
                system.plugins.event("step_attempt_failed", run.run_id, step_id=step.step_id, error=str(failure),
                                     action=recovery.action)
                if recovery.action == "retry" and spec.retry_safe:
                    if recovery.delay_s > 0:
                        await asyncio.sleep(recovery.delay_s)
                    continue
                fallback = system.tools.get(recovery.fallback_tool or "") if recovery.action == "fallback" else None
                if fallback is not None and fallback is not spec:
                    spec = fallback
                    attempt = 0
                    must_validate = True
                    continue
                return self._finish(step, StepStatus.FAILED, started, args=args, tool=spec.name,
                                    error=f"{failure} ({recovery.reason})", attempts=attempt)
            return self._finish(step, StepStatus.SUCCEEDED, started, args=args, tool=spec.name, result=result,
                                cost=cost, attempts=attempt, verdict=verdict)

    async def _attempt(self, step: PlanStep, spec: ToolSpec, args: Mapping[str, Any]) -> tuple[Any, float]:
        system = self.system
        run = self.run
        key = f"{run.run_id}:{step.step_id}"
        call_args = {**args, "idempotency_key": key} if spec.accepts_key else args
        reservation = run.budget.reserve(spec.cost_usd, f"tool {spec.name}") if spec.cost_usd else None
        breaker = system.breakers.get(spec.name)
        try:
            if spec.rate_limit is not None:
                await system.rate_limits.acquire(spec, spec.timeout)
            token = breaker.admit()
            try:
                self.journal.intent(self.lease, StepRecord(step.step_id, "forward", "intent", spec.name, args, key))
            except BaseException:
                breaker.release(token)
                raise
            try:
                result = await system.sandboxes[spec.isolation].run(
                    ToolCall(spec, call_args, spec.timeout, run.run_id, step.step_id)
                )
            except ToolError as exc:
                # A refusal (bad input, business rule) means the tool is up; only transient failures count.
                if exc.retryable:
                    breaker.record_failure(token)
                else:
                    breaker.record_success(token)
                raise
            except Exception:
                breaker.record_failure(token)
                raise
            except BaseException:  # cancelled: the call proved nothing either way
                breaker.release(token)
                raise
            breaker.record_success(token)
        except (ToolError, SandboxError) as exc:
            if reservation is not None:
                reservation.settle(spec.cost_usd)  # the call was attempted: it may have been billed
            raise StepFailure(str(exc), isinstance(exc, ToolError) and exc.retryable) from exc
        if reservation is not None:
            reservation.settle(spec.cost_usd)
            run.costs.append(CostRecord(kind="tool", cost_usd=spec.cost_usd, tool=spec.name, step_id=step.step_id))
        return result, spec.cost_usd

    # --- journal ----------------------------------------------------------------

    def _journal_outcome(self, step: PlanStep, result: StepResult) -> None:
        self.journal.outcome(
            self.lease,
            StepRecord(
                step.step_id, "forward", "outcome", result.tool_name, result.tool_args,
                f"{self.run.run_id}:{step.step_id}", result.status.value, result.result, result.error,
                result.duration_s, result.cost_usd, result.attempts,
                {"passed": result.verdict.passed, "score": result.verdict.score, "reason": result.verdict.reason}
                if result.verdict else None,
            ),
        )

    def _keep_lease(self) -> None:
        if time.time() > self.lease.expires_at - self._ttl / 2:
            self.lease = self.journal.renew(self.lease, self._ttl)

    def _finish(
        self,
        step: PlanStep,
        status: StepStatus,
        started: float,
        *,
        args: Any = None,
        tool: str | None = None,
        result: Any = None,
        error: str | None = None,
        cost: float = 0.0,
        attempts: int = 0,
        verdict: Verdict | None = None,
    ) -> StepResult:
        return StepResult(
            step_id=step.step_id,
            tool_name=tool or step.tool_name,
            status=status,
            tool_args=step.tool_args if args is None else args,
            result=result,
            error=error,
            duration_s=perf_counter() - started,
            cost_usd=cost,
            attempts=attempts,
            verdict=verdict,
        )


def step_result_from_record(record: StepRecord) -> StepResult:
    """A ``StepResult`` rebuilt from a journaled outcome."""
    verdict = Verdict(**record.verdict) if record.verdict else None
    return StepResult(
        step_id=record.step_id,
        tool_name=record.tool_name,
        status=StepStatus(record.status),
        tool_args=record.args,
        result=record.result,
        error=record.error,
        duration_s=record.duration_s,
        cost_usd=record.cost_usd,
        attempts=record.attempts,
        verdict=verdict,
    )
