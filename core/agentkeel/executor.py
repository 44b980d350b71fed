"""Executes a checked plan step by step: the per-step path of a request.

For each step: dependencies and condition, references resolved, arguments
validated, permission decided and audited, breaker and rate limit, the sandbox
backend, the evaluator, and recovery (retry only when retry-safe, then the
fallback tool, else fail and skip the steps that depend on it).

This is the path benchmarked in ``bench/overhead.py``; keep it lean.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Any

from agentkeel.errors import BudgetExceededError, SandboxError, ToolError
from agentkeel.plan import RefError, evaluate_condition, resolve_args
from agentkeel.sandbox import ToolCall
from agentkeel.types import CostRecord, PlanStep, StepResult, StepStatus, ToolSpec, Verdict
from agentkeel.validation import args_errors

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.system import AgentSystem

_BENIGN = (StepStatus.SUCCEEDED, StepStatus.SKIPPED)


class StepFailure(Exception):
    """One attempt of a step failed; carries whether trying again could help."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class PlanExecutor:
    """Runs the steps of one plan for one request."""

    def __init__(self, system: AgentSystem, run: RunContext) -> None:
        self.system = system
        self.run = run
        self.results: dict[int, Any] = {}
        self.outcomes: dict[int, StepResult] = {}
        self.budget_exhausted = False
        self.condition_skipped: set[int] = set()

    async def execute(self, steps: tuple[PlanStep, ...]) -> list[StepResult]:
        out = []
        for step in steps:
            result = await self.execute_step(step)
            self.outcomes[step.step_id] = result
            if result.status is StepStatus.SUCCEEDED:
                self.results[step.step_id] = result.result
            out.append(result)
        return out

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
                status = dep_result.status.value if dep_result else "not run"
                return self._finish(step, StepStatus.SKIPPED, started, error=f"depends on step {dep}, which {status}")
        try:
            if step.when is not None and not evaluate_condition(step.when, self.results):
                self.condition_skipped.add(step.step_id)
                return self._finish(step, StepStatus.SKIPPED, started, error="condition not met")
            args = resolve_args(step.tool_args, self.results) if step.depends_on else step.tool_args
        except RefError as exc:
            return self._finish(step, StepStatus.FAILED, started, error=str(exc))

        spec = system.tools[step.tool_name]
        # The plan check validated arguments that hold no references; the rest,
        # and any fallback tool's arguments, are validated here.
        must_validate = bool(step.depends_on)
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
                return self._finish(step, StepStatus.DENIED, started, args=args, error=decision.reason)
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
                system.audit_call(run, spec.name, "failed", str(failure), args)
                decision_r = system.plugins.recover(step, spec, str(failure), attempt, failure.retryable, run)
                system.plugins.event("step_attempt_failed", run.run_id, step_id=step.step_id, error=str(failure),
                                     action=decision_r.action)
                if decision_r.action == "retry" and spec.retry_safe:
                    if decision_r.delay_s > 0:
                        await asyncio.sleep(decision_r.delay_s)
                    continue
                fallback = system.tools.get(decision_r.fallback_tool or "") if decision_r.action == "fallback" else None
                if fallback is not None and fallback is not spec:
                    spec = fallback
                    attempt = 0
                    must_validate = True
                    continue
                return self._finish(step, StepStatus.FAILED, started, args=args, tool=spec.name,
                                    error=f"{failure} ({decision_r.reason})", attempts=attempt)
            system.audit_call(run, spec.name, "succeeded", "", args)
            return self._finish(step, StepStatus.SUCCEEDED, started, args=args, tool=spec.name, result=result,
                                cost=cost, attempts=attempt, verdict=verdict)

    async def _attempt(self, step: PlanStep, spec: ToolSpec, args: Any) -> tuple[Any, float]:
        system = self.system
        run = self.run
        if spec.accepts_key:
            args = {**args, "idempotency_key": f"{run.run_id}:{step.step_id}"}
        reservation = run.budget.reserve(spec.cost_usd, f"tool {spec.name}") if spec.cost_usd else None
        breaker = system.breakers.get(spec.name)
        try:
            if spec.rate_limit is not None:
                await system.rate_limits.acquire(spec, spec.timeout)
            token = breaker.admit()
            backend = system.sandboxes[spec.isolation]
            try:
                result = await backend.run(ToolCall(spec, args, spec.timeout, run.run_id, step.step_id))
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
        step_result = StepResult(
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
        self.system.plugins.event("step_finished", self.run.run_id, step=step_result)
        return step_result
