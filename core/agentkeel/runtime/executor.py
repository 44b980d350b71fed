"""Executes a checked plan step by step: the per-step path of a request.

For each step: dependencies and condition, references resolved, arguments
validated, then ``StepRunner.run_call``: permission decided and audited, the
approval (when the call needs one: else the run stops ``waiting``), the tool
router (budget, rate limit, breaker, journal intent, sandbox), the evaluator,
recovery (retry only when retry-safe, then the fallback tool, else
fail, or replan); and the outcome journaled before the next step starts. A step
that fails or is denied aborts the plan: later steps do not run; the pipeline
then replans (when recovery asked for it) or aborts the run, compensating the
steps that took effect (``compensation.py``, through the same ``StepRunner``).
An ``optional`` step that failed without taking effect does not abort: the run
goes on and ends ``degraded``.

A tool that ran has had its effect. When the evaluator rejects the result of a
tool that is not retry-safe, the step fails at once (no retry, no fallback: a
second tool would make a second effect), its result is journaled, and it is
compensated if the run aborts.

On resume, steps with a journaled outcome are not run again; a step found
started but not finished is re-run only when its tool is retry-safe, otherwise
the run stops ``in_doubt``.

This is the path benchmarked in ``bench/overhead.py``; keep it lean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.errors import BudgetExceededError
from agentkeel.journal.base import RunState, StepRecord
from agentkeel.jsonvalue import JSONValueError
from agentkeel.jsonvalue import check as check_json
from agentkeel.logs import STEP_ID
from agentkeel.planner.plan import RefError, evaluate_condition, resolve_args
from agentkeel.tools.router import CallFailure, ToolRouter, idempotency_key
from agentkeel.tools.validation import args_errors
from agentkeel.types import (
    Decision,
    PlanStep,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
    Verdict,
)

if TYPE_CHECKING:
    from agentkeel.context import RunContext
    from agentkeel.permissions.approvals import ApprovalGate
    from agentkeel.plugin.facade import Plugins
    from agentkeel.runtime.lease import HeldLease
    from agentkeel.types import Plan

ABORTING = (StepStatus.FAILED, StepStatus.DENIED)

BUDGET = "budget"
"""``run_call``'s signal: the budget ran out."""
REPLAN = "replan"
"""``run_call``'s signal: recovery asked for a different plan."""

AuditDecision = Callable[["RunContext", str, Decision, "Mapping[str, Any] | None"], None]


def took_effect(step: StepResult) -> bool:
    """True when the step's tool ran to completion: it succeeded, or it returned a
    result the evaluator rejected (the effect happened all the same)."""
    if step.status is StepStatus.SUCCEEDED:
        return True
    return step.status is StepStatus.FAILED and step.verdict is not None and not step.verdict.passed


@attrs.define
class StepRunner:
    """Runs one step's tool calls with permissions, evaluation and recovery; shared by
    the forward path and compensation so both get the same guarantees."""

    plugins: Plugins
    tools: Mapping[str, ToolSpec]
    router: ToolRouter
    audit: AuditDecision
    approvals: ApprovalGate | None = None

    async def run_call(
        self,
        run: RunContext,
        step: PlanStep,
        spec: ToolSpec,
        args: Mapping[str, Any],
        *,
        kind: str,
        lease: HeldLease,
        validate: bool,
        started: float,
    ) -> tuple[StepResult, str | None]:
        """The step's result (its tool: the last one tried) and a signal: ``BUDGET`` when
        the budget ran out, ``REPLAN`` when recovery asked for a different plan, else None."""
        plugins = self.plugins

        def finish(status: StepStatus, result: Any = None, error: str | None = None, verdict: Verdict | None = None,
                   cost: float = 0.0) -> StepResult:
            return StepResult(step.step_id, spec.name, status, args, result, error, perf_counter() - started,
                              cost, attempt, verdict)

        attempt = 0
        while True:
            if validate:
                problems = args_errors(spec, args)
                if problems:
                    return finish(StepStatus.FAILED, error="; ".join(problems)), None
                validate = False
            decision = plugins.authorize(run.principal, spec, args)
            self.audit(run, spec.name, decision, args)
            if not decision.allowed:
                status = StepStatus.WAITING if decision.wait else StepStatus.DENIED
                return finish(status, error=decision.reason), None
            if (attempt == 0 and kind == "forward" and self.approvals is not None
                    and self.approvals.needs_approval(run.principal, spec, args)):
                stop = self.approvals.check(run, step.step_id, spec, args, lease.journal, lease.lease)
                if stop is not None:
                    return finish(stop[0], error=stop[1]), None
            attempt += 1
            rejected: tuple[Any, Verdict] | None = None  # a result the evaluator turned down
            try:
                result = await self.router.call(
                    run, spec, args, step_id=step.step_id, kind=kind, attempt=attempt, intent=lease.intent
                )
            except BudgetExceededError as exc:
                return finish(StepStatus.FAILED, error=str(exc)), BUDGET
            except CallFailure as failure:
                if failure.timed_out and not spec.retry_safe:
                    # Given up at the deadline: it may have taken effect, or still may. Running it
                    # again could repeat the effect; compensating it could undo one that never happened.
                    return finish(StepStatus.IN_DOUBT, error=str(failure)), None
                error, retryable = str(failure), failure.retryable
            else:
                try:
                    check_json(result, what="the tool's result")
                except JSONValueError as exc:
                    # The tool ran (its effect stands, and is compensated like any other), but its
                    # result cannot be journaled, evaluated or referenced by later steps.
                    result, verdict = None, Verdict(False, 0.0, str(exc))
                else:
                    with run.span("evaluate", step_id=step.step_id, tool=spec.name, call_kind=kind) as span:
                        judged = plugins.evaluate(step, spec, result, run)
                        verdict = judged if isinstance(judged, Verdict) else await judged
                        span.set(passed=verdict.passed, score=verdict.score, reason=verdict.reason)
                if verdict.passed:
                    return finish(StepStatus.SUCCEEDED, result, verdict=verdict, cost=spec.cost_usd), None
                error = f"evaluator rejected the result: {verdict.reason}"
                if not spec.retry_safe:
                    # The tool ran: its effect stands. Trying again, or another tool, would repeat it.
                    return finish(
                        StepStatus.FAILED, result, verdict=verdict, cost=spec.cost_usd,
                        error=f"{error} ({spec.name} is not retry-safe: its effect stands and is "
                        "compensated if the run aborts)",
                    ), None
                retryable = True
                rejected = (result, verdict)
            with run.span("recover", step_id=step.step_id, tool=spec.name, attempt=attempt, retryable=retryable,
                          call_kind=kind, error=error) as span:
                recovery = plugins.recover(step, spec, error, attempt, retryable, run)
                span.set(action=recovery.action, reason=recovery.reason,
                         fallback_tool=recovery.fallback_tool or "", delay_s=recovery.delay_s)
            if run.listened:
                run.emit("step_attempt_failed", step_id=step.step_id, error=error, action=recovery.action,
                         call_kind=kind)
            if recovery.action == "retry" and spec.retry_safe:
                if recovery.delay_s > 0:
                    await asyncio.sleep(recovery.delay_s)
                continue
            fallback = self.tools.get(recovery.fallback_tool or "") if recovery.action == "fallback" else None
            if fallback is not None and fallback is not spec and rejected is None:
                spec = fallback
                attempt = 0
                validate = True
                continue
            signal = REPLAN if recovery.action == "replan" and kind == "forward" else None
            if rejected is None:
                return finish(StepStatus.FAILED, error=f"{error} ({recovery.reason})"), signal
            return finish(StepStatus.FAILED, rejected[0], error=f"{error} ({recovery.reason})", verdict=rejected[1],
                          cost=spec.cost_usd), signal


class PlanExecutor:
    """Runs the steps of a run's plan revisions, one ``execute`` per revision, journaling
    as it goes; results and outcomes carry over from one revision to the next."""

    def __init__(self, runner: StepRunner, run: RunContext, lease: HeldLease, state: RunState | None = None) -> None:
        self.runner = runner
        self.run = run
        self.lease = lease
        self.state = state
        self.results: dict[int, Any] = {}
        self.outcomes: dict[int, StepResult] = {}
        self.budget_exhausted = False
        self.condition_skipped: set[int] = set()
        self.degraded: list[StepResult] = []
        """Optional steps that failed without taking effect: the run went on without them."""
        self.replan_step: StepResult | None = None
        """The failed step whose recovery asked for a replan (set by ``execute``)."""
        self.status = RunStatus.SUCCEEDED
        self.detail = ""
        if state is not None:  # earlier revisions' results, for references and dependencies
            for record in state.steps:
                if record.kind == "forward" and record.phase == "outcome" and record.status != "pending":
                    self.outcomes[record.step_id] = step_result_from_record(record)
                    if record.status == StepStatus.SUCCEEDED.value:
                        self.results[record.step_id] = record.result
                    if record.status == StepStatus.SKIPPED.value and record.error == "condition not met":
                        self.condition_skipped.add(record.step_id)

    async def execute(self, plan: Plan) -> list[StepResult]:
        """Run (or resume) every step of ``plan``; sets ``status``, ``detail`` and ``replan_step``."""
        self.status, self.detail, self.replan_step = RunStatus.SUCCEEDED, "", None
        out: list[StepResult] = []
        stopped_at: PlanStep | None = None
        run = self.run
        stopped_before: PlanStep | None = None  # a stop requested (cancel or pause) before this step
        for step in plan.steps:
            result = self._recorded(step)
            if result is None:
                if self.state is not None and self._in_doubt(step):
                    out.append(self.outcomes[step.step_id])
                    stopped_at = step
                    break
                if run.stop is not None:
                    cancel = run.stop.kind == "cancel"
                    self.status = RunStatus.CANCELLED if cancel else RunStatus.RUNNING
                    self.detail = (f"{'cancelled' if cancel else 'paused'} before step {step.step_id} "
                                   f"({step.tool_name}): {run.stop.reason}")
                    stopped_before = step
                    break
                self.lease.keep()
                if run.listened:
                    run.emit("step_started", step_id=step.step_id, tool=step.tool_name,
                             description=step.description)
                token = STEP_ID.set(step.step_id)
                try:
                    with run.span("step", step_id=step.step_id, tool=step.tool_name, call_kind="forward") as span:
                        result, signal = await self.execute_step(step)
                        span.set(status=result.status.value, attempts=result.attempts, tool=result.tool_name,
                                 cost_usd=result.cost_usd, step_error=result.error or "")
                finally:
                    STEP_ID.reset(token)
                if result.status is StepStatus.IN_DOUBT:
                    # No outcome is journaled: the journal says what is known (started, never
                    # finished), so a resume asks a human exactly as after a crash.
                    self.status = RunStatus.IN_DOUBT
                    self.detail = in_doubt_detail(
                        run.run_id, step.step_id, result.tool_name, result.tool_args,
                        f"was given up at its timeout ({result.error}) and may have taken effect or still may",
                    )
                    result = attrs.evolve(result, error=self.detail)
                    self.outcomes[step.step_id] = result
                    out.append(result)
                    stopped_at = step
                    break
                if result.status is StepStatus.WAITING:
                    self.status = RunStatus.WAITING
                    self.detail = f"step {step.step_id} ({step.tool_name}) is waiting: {result.error}"
                    out.append(result)
                    if run.listened:
                        run.emit("step_finished", step=result)
                    stopped_at = step
                    break
                if signal == REPLAN and result.status is StepStatus.FAILED and not step.optional:
                    # Journaled before the outcome: a resume after a crash in between still replans.
                    self.lease.set_status(RunStatus.RUNNING, f"step {step.step_id} ({result.tool_name}) failed: "
                                          f"{result.error}; replanning", then_status="replan")
                    self.replan_step = result
                self.lease.outcome(outcome_record(run.run_id, step.step_id, "forward", result))
                if run.listened:
                    run.emit("step_finished", step=result)
            self.outcomes[step.step_id] = result
            if result.status is StepStatus.SUCCEEDED:
                self.results[step.step_id] = result.result
            out.append(result)
            if (step.optional and result.status is StepStatus.FAILED and not took_effect(result)
                    and not self.budget_exhausted):
                self.degraded.append(result)  # unavailable: the run goes on without it
                self.replan_step = None
                continue
            if result.status in ABORTING or self.budget_exhausted:
                self.status = (
                    RunStatus.BUDGET_EXHAUSTED if self.budget_exhausted
                    else RunStatus.DENIED if result.status is StepStatus.DENIED
                    else RunStatus.FAILED
                )
                self.detail = f"step {step.step_id} ({result.tool_name}) {result.status.value}: {result.error}"
                stopped_at = step
                break
        if stopped_before is not None:
            paused = self.status is RunStatus.RUNNING
            status = StepStatus.PENDING if paused else StepStatus.SKIPPED
            for step in plan.steps:
                if step.step_id >= stopped_before.step_id and step.step_id not in self.outcomes:
                    out.append(StepResult(step.step_id, step.tool_name, status, step.tool_args,
                                          error=f"not run: {self.detail}"))
        elif stopped_at is not None:
            paused = self.status is RunStatus.WAITING
            reason = "run paused" if paused else "run stopped"
            status = StepStatus.PENDING if paused else StepStatus.SKIPPED
            for step in plan.steps:
                if step.step_id > stopped_at.step_id and step.step_id not in self.outcomes:
                    out.append(StepResult(step.step_id, step.tool_name, status, step.tool_args,
                                          error=f"not run: {reason} at step {stopped_at.step_id}"))
        elif self.degraded and self.status is RunStatus.SUCCEEDED:
            self.status = RunStatus.DEGRADED
            self.detail = "; ".join(
                f"optional step {s.step_id} ({s.tool_name}) was unavailable and skipped: {s.error}"
                for s in self.degraded)
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
        spec = self.runner.tools.get(intent.tool_name)
        if spec is not None and spec.retry_safe:
            return False  # re-run: idempotent, or it gets the same idempotency key again
        self.status = RunStatus.IN_DOUBT
        self.detail = in_doubt_detail(self.run.run_id, step.step_id, intent.tool_name, intent.args,
                                      "started but its outcome was never recorded")
        self.outcomes[step.step_id] = StepResult(step.step_id, intent.tool_name, StepStatus.IN_DOUBT,
                                                 intent.args, error=self.detail)
        return True

    # --- one step ---------------------------------------------------------------

    async def execute_step(self, step: PlanStep) -> tuple[StepResult, str | None]:
        started = perf_counter()
        for dep in step.depends_on:
            dep_result = self.outcomes.get(dep)
            if dep_result is None or dep_result.status is not StepStatus.SUCCEEDED:
                if dep in self.condition_skipped:
                    self.condition_skipped.add(step.step_id)
                    return _skipped(step, started, f"step {dep} was skipped"), None
                status = dep_result.status.value if dep_result else "did not run"
                return _skipped(step, started, f"depends on step {dep}, which {status}"), None
        try:
            if step.when is not None and not evaluate_condition(step.when, self.results):
                self.condition_skipped.add(step.step_id)
                return _skipped(step, started, "condition not met"), None
            args = resolve_args(step.tool_args, self.results) if step.arg_refs else step.tool_args
        except RefError as exc:
            return StepResult(step.step_id, step.tool_name, StepStatus.FAILED, step.tool_args, error=str(exc),
                              duration_s=perf_counter() - started), None
        # The plan check validated arguments that hold no references; the rest are validated here.
        result, signal = await self.runner.run_call(
            self.run, step, self.runner.tools[step.tool_name], args, kind="forward", lease=self.lease,
            validate=bool(step.arg_refs), started=started,
        )
        if signal == BUDGET:
            self.budget_exhausted = True
        return result, signal


def in_doubt_detail(run_id: str, step_id: int, tool_name: str, args: Mapping[str, Any], what: str) -> str:
    """What a human must check, and how to tell agentkeel, for a step whose effect is unknown."""
    return (
        f"step {step_id} ({tool_name}) {what}, and {tool_name} is neither idempotent nor takes an "
        f"idempotency key, so it was not run again. A human must check whether {tool_name} took effect "
        f"for arguments {dict(args)} (idempotency key {idempotency_key(run_id, step_id)}), then run "
        f"`agentkeel resume {run_id} --resolve {step_id}=done` (it happened) or "
        f"`--resolve {step_id}=not-done` (run it again)."
    )


def _skipped(step: PlanStep, started: float, why: str) -> StepResult:
    return StepResult(step.step_id, step.tool_name, StepStatus.SKIPPED, step.tool_args, error=why,
                      duration_s=perf_counter() - started)


def outcome_record(run_id: str, step_id: int, kind: str, result: StepResult) -> StepRecord:
    verdict = result.verdict
    return StepRecord(
        step_id, kind, "outcome", result.tool_name, result.tool_args, idempotency_key(run_id, step_id),
        result.status.value, result.result, result.error, result.duration_s, result.cost_usd, result.attempts,
        {"passed": verdict.passed, "score": verdict.score, "reason": verdict.reason} if verdict else None,
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
