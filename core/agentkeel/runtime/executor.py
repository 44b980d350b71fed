"""Executes a checked plan: the per-step path of a request.

Steps run as their dependencies allow (``PlanExecutor``): up to ``[executor]
max_parallel`` at once, a lone ready step inline. For each step: dependencies
and condition, references resolved, arguments validated, then
``StepRunner.run_call``: permission decided and audited, the approval (when
the call needs one: else the run stops ``waiting``), the tool router (budget,
rate limit, breaker, journal intent, sandbox), the evaluator, recovery (retry
only when retry-safe, then the fallback tool, else fail, or replan); and the
outcome journaled before any step that depends on it starts (for a retry-safe
tool, in the transaction of the run's next journal write; see ``HeldLease``).
A step that fails or is denied aborts the plan: no further step starts, the
steps still running are awaited; the pipeline then replans (when recovery
asked for it) or aborts the run, compensating the steps that took effect
(``compensation.py``, through the same ``StepRunner``).
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
import heapq
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
            # A forward step of a retry-safe tool with nothing to undo needs no intent committed
            # before its call: lost to a crash, the step is re-run, which its tool makes safe.
            intent = (lease.deferred_intent if kind == "forward" and spec.retry_safe and spec.rollback is None
                      else lease.intent)
            try:
                result = await self.router.call(
                    run, spec, args, step_id=step.step_id, kind=kind, attempt=attempt, intent=intent
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
                    if run.observers is None:
                        judged = plugins.evaluate(step, spec, result, run)
                        verdict = judged if isinstance(judged, Verdict) else await judged
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
    as it goes; results and outcomes carry over from one revision to the next.

    A plan is a graph: a step waits for the steps it depends on (``PlanStep.depends_on``:
    its references, its condition's, its ``"depends_on"``) and, with ``order_effects``,
    a step with an effect (its tool, or its fallback, is not idempotent) waits for every
    earlier step and every later step waits for it. Every step whose dependencies are
    decided starts, up to ``max_parallel`` at once (in step order). A lone ready step runs
    inline (no task): a chain costs what a sequential loop does."""

    def __init__(self, runner: StepRunner, run: RunContext, lease: HeldLease, state: RunState | None = None,
                 *, max_parallel: int = 1, order_effects: bool = True) -> None:
        self.runner = runner
        self.run = run
        self.lease = lease
        self.state = state
        self.max_parallel = max(1, max_parallel)
        self.order_effects = order_effects
        self.results: dict[int, Any] = {}
        self.outcomes: dict[int, StepResult] = {}
        self.completed: list[int] = []
        """Forward steps in the order their outcomes were decided (journaled ones first, as journaled):
        compensation runs in the reverse of it."""
        self.budget_exhausted = False
        self.condition_skipped: set[int] = set()
        self.degraded: list[StepResult] = []
        """Optional steps that failed without taking effect: the run went on without them."""
        self.replan_step: StepResult | None = None
        """The failed step whose recovery asked for a replan (set by ``execute``)."""
        self.status = RunStatus.SUCCEEDED
        self.detail = ""
        self._halt: tuple[int, PlanStep, StepResult | None] | None = None
        self._stopped_before: PlanStep | None = None  # a stop requested (cancel or pause) before this step
        if state is not None:  # earlier revisions' results, for references and dependencies
            for record in state.steps:
                if record.kind == "forward" and record.phase == "outcome" and record.status != "pending":
                    self.outcomes[record.step_id] = step_result_from_record(record)
                    self.completed.append(record.step_id)
                    if record.status == StepStatus.SUCCEEDED.value:
                        self.results[record.step_id] = record.result
                    if record.status == StepStatus.SKIPPED.value and record.error == "condition not met":
                        self.condition_skipped.add(record.step_id)

    def graph(self, plan: Plan) -> dict[int, set[int]]:
        """For each step of ``plan``, the steps of ``plan`` it must wait for."""
        ids = {step.step_id for step in plan.steps}
        tools = self.runner.tools
        deps: dict[int, set[int]] = {}
        last_effect: int | None = None
        since: list[int] = []  # steps after the last effect
        for step in plan.steps:
            mine = {d for d in step.depends_on if d in ids}
            if self.order_effects:
                if has_effect(tools, step.tool_name):
                    mine.update(since)
                    if last_effect is not None:
                        mine.add(last_effect)
                    last_effect, since = step.step_id, []
                else:
                    if last_effect is not None:
                        mine.add(last_effect)
                    since.append(step.step_id)
            deps[step.step_id] = mine
        return deps

    async def execute(self, plan: Plan) -> list[StepResult]:
        """Run (or resume) every step of ``plan``; sets ``status``, ``detail`` and ``replan_step``."""
        self.status, self.detail, self.replan_step = RunStatus.SUCCEEDED, "", None
        if self.max_parallel == 1 and not self.order_effects:
            # One at a time, in step order: every dependency is decided before its dependant starts.
            deps: dict[int, set[int]] = {s.step_id: set() for s in plan.steps}
        else:
            deps = self.graph(plan)
        waiting = {sid: len(d) for sid, d in deps.items()}
        dependants: dict[int, list[int]] = {}
        for sid, d in deps.items():
            for dep in d:
                dependants.setdefault(dep, []).append(sid)
        by_id = {step.step_id: step for step in plan.steps}
        ready = [sid for sid, n in waiting.items() if n == 0]
        heapq.heapify(ready)
        finished: dict[int, StepResult] = {}  # this execute's steps, any status (waiting too)
        self._halt = None
        self._stopped_before = None
        inflight: dict[asyncio.Task[tuple[StepResult, str | None]], PlanStep] = {}
        done: list[asyncio.Task[tuple[StepResult, str | None]]] = []  # finished, not yet settled
        wake: list[asyncio.Future[None] | None] = [None]  # what the loop awaits while steps are in flight

        def on_done(task: asyncio.Task[tuple[StepResult, str | None]]) -> None:
            done.append(task)
            if wake[0] is not None and not wake[0].done():
                wake[0].set_result(None)

        run = self.run

        def decide(step: PlanStep, result: StepResult) -> None:
            finished[step.step_id] = result
            for later in dependants.get(step.step_id, ()):
                waiting[later] -= 1
                if waiting[later] == 0:
                    heapq.heappush(ready, later)

        while ready or inflight:
            launch: list[PlanStep] = []
            while ready and self._halt is None and self._stopped_before is None and (
                    len(inflight) + len(launch) < self.max_parallel):
                step = by_id[heapq.heappop(ready)]
                result = self._recorded(step)
                if result is not None:
                    decide(step, result)
                    self._after(step, result, journaled=True)
                    continue
                if self.state is not None and self._in_doubt(step):
                    finished[step.step_id] = self.outcomes[step.step_id]
                    self._stop(0, step, None)
                    break
                if run.stop is not None:
                    cancel = run.stop.kind == "cancel"
                    self.status = RunStatus.CANCELLED if cancel else RunStatus.RUNNING
                    self.detail = (f"{'cancelled' if cancel else 'paused'} before step {step.step_id} "
                                   f"({step.tool_name}): {run.stop.reason}")
                    self._stopped_before = step
                    break
                launch.append(step)
            if not launch and not inflight:
                break
            if len(launch) == 1 and not inflight:
                step = launch[0]  # alone: inline, no task
                result, signal = await self._step(step, ())
                decide(step, self._settle(step, result, signal))
                continue
            wave = sorted([*(s.step_id for s in inflight.values()), *(s.step_id for s in launch)]) if (
                run.listened) else []
            loop = asyncio.get_running_loop()
            for step in launch:
                alongside = tuple(i for i in wave if i != step.step_id)
                task = loop.create_task(self._step(step, alongside))
                task.add_done_callback(on_done)
                inflight[task] = step
            try:
                while not done:
                    woken: asyncio.Future[None] = loop.create_future()
                    wake[0] = woken
                    await woken
            except BaseException:  # this run was cancelled: so are its steps, as a lone step would be
                await _drain(inflight, cancel=True)
                raise
            batch = list(done)  # in the order they finished: compensation goes by it
            done.clear()
            for task in batch:
                step = inflight.pop(task)
                try:
                    result, signal = task.result()
                except BaseException:
                    await _drain(inflight, cancel=False)
                    raise
                decide(step, self._settle(step, result, signal))
        if self.state is not None and (self._halt is not None or (
                self._stopped_before is not None and self.status is RunStatus.CANCELLED)):
            self._interrupted(plan, finished)
        return self._collect(plan, finished)

    def _interrupted(self, plan: Plan, finished: dict[int, StepResult]) -> None:
        """Steps a crashed process started and never finished, which this resume will not start
        (the run stopped first, e.g. at a failure journaled beside them in one wave): a step of a
        tool that is not retry-safe puts the run in doubt (the lowest one names it); any other is
        ``running``, so a rollback undoes it by its idempotency key."""
        assert self.state is not None
        for step in plan.steps:
            if step.step_id in finished or step.step_id in self.outcomes:
                continue
            intent, outcome = self.state.forward(step.step_id)
            if intent is None or outcome is not None:
                continue
            spec = self.runner.tools.get(intent.tool_name)
            if spec is not None and spec.retry_safe:
                finished[step.step_id] = StepResult(step.step_id, intent.tool_name, StepStatus.RUNNING, intent.args,
                                                    error="started before a crash; no outcome recorded")
            elif self.status is RunStatus.IN_DOUBT:  # another step already names the doubt
                finished[step.step_id] = StepResult(
                    step.step_id, intent.tool_name, StepStatus.IN_DOUBT, intent.args,
                    error=in_doubt_detail(self.run.run_id, step.step_id, intent.tool_name, intent.args,
                                          "started but its outcome was never recorded"))
            else:
                self._in_doubt(step)
                finished[step.step_id] = self.outcomes[step.step_id]
                self._halt = (0, step, None)

    async def _step(self, step: PlanStep, alongside: tuple[int, ...]) -> tuple[StepResult, str | None]:
        """Run one step (journaling its intent); its outcome is journaled by ``_settle``."""
        run = self.run
        self.lease.keep()
        if run.listened:
            run.emit("step_started", step_id=step.step_id, tool=step.tool_name, description=step.description,
                     alongside=list(alongside))
        token = STEP_ID.set(step.step_id)
        try:
            if run.observers is None:
                return await self.execute_step(step)
            with run.span("step", step_id=step.step_id, tool=step.tool_name, call_kind="forward") as span:
                result, signal = await self.execute_step(step)
                span.set(status=result.status.value, attempts=result.attempts, tool=result.tool_name,
                         cost_usd=result.cost_usd, step_error=result.error or "")
            return result, signal
        finally:
            STEP_ID.reset(token)

    def _settle(self, step: PlanStep, result: StepResult, signal: str | None) -> StepResult:
        """Journal a step's outcome (before any dependant starts) and decide what it means for the
        run; returns the step's result as the run reports it."""
        run = self.run
        if result.status is StepStatus.IN_DOUBT:
            # No outcome is journaled: the journal says what is known (started, never
            # finished), so a resume asks a human exactly as after a crash.
            detail = in_doubt_detail(
                run.run_id, step.step_id, result.tool_name, result.tool_args,
                f"was given up at its timeout ({result.error}) and may have taken effect or still may",
            )
            result = attrs.evolve(result, error=detail)
            self.outcomes[step.step_id] = result
            self._stop(0, step, result, RunStatus.IN_DOUBT, detail)
            return result
        if result.status is StepStatus.WAITING:
            if run.listened:
                run.emit("step_finished", step=result)
            self._stop(2, step, result, RunStatus.WAITING,
                       f"step {step.step_id} ({step.tool_name}) is waiting: {result.error}")
            return result
        if signal == REPLAN and result.status is StepStatus.FAILED and not step.optional:
            # Journaled before the outcome: a resume after a crash in between still replans.
            self.lease.set_status(RunStatus.RUNNING, f"step {step.step_id} ({result.tool_name}) failed: "
                                  f"{result.error}; replanning", then_status="replan")
            self.replan_step = result
        spec = self.runner.tools.get(result.tool_name)
        self.lease.outcome(outcome_record(run.run_id, step.step_id, "forward", result),
                           defer=spec is not None and spec.retry_safe)
        if run.listened:
            run.emit("step_finished", step=result)
        self._after(step, result)
        return result

    def _after(self, step: PlanStep, result: StepResult, journaled: bool = False) -> None:
        """Record a decided step (run now, or ``journaled`` by an earlier process); an abort stops the plan."""
        self.outcomes[step.step_id] = result
        if not journaled:
            self.completed.append(step.step_id)
        if result.status is StepStatus.SUCCEEDED:
            self.results[step.step_id] = result.result
        if (step.optional and result.status is StepStatus.FAILED and not took_effect(result)
                and not self.budget_exhausted):
            self.degraded.append(result)  # unavailable: the run goes on without it
            return
        if result.status in ABORTING or self.budget_exhausted:
            status = (
                RunStatus.BUDGET_EXHAUSTED if self.budget_exhausted
                else RunStatus.DENIED if result.status is StepStatus.DENIED
                else RunStatus.FAILED
            )
            self._stop(1, step, result, status,
                       f"step {step.step_id} ({result.tool_name}) {result.status.value}: {result.error}")

    def _stop(self, rank: int, step: PlanStep, result: StepResult | None, status: RunStatus | None = None,
              detail: str = "") -> None:
        """Stop starting steps. Of several reasons in one wave the gravest wins (in doubt, then an
        abort, then waiting for approval), then the lowest step id."""
        if self._halt is not None and (self._halt[0], self._halt[1].step_id) <= (rank, step.step_id):
            return
        self._halt = (rank, step, result)
        if status is not None:
            self.status, self.detail = status, detail

    def _collect(self, plan: Plan, finished: Mapping[int, StepResult]) -> list[StepResult]:
        """The plan's steps in order: what each did, or why it did not run."""
        out: list[StepResult] = []
        if self._stopped_before is not None:
            paused = self.status is RunStatus.RUNNING
            why = f"not run: {self.detail}"
        elif self._halt is not None:
            paused = self.status is RunStatus.WAITING
            why = f"not run: {'run paused' if paused else 'run stopped'} at step {self._halt[1].step_id}"
        else:
            paused, why = False, ""
        status = StepStatus.PENDING if paused else StepStatus.SKIPPED
        for step in plan.steps:
            result = finished.get(step.step_id) or self.outcomes.get(step.step_id)
            if result is None:
                result = StepResult(step.step_id, step.tool_name, status, step.tool_args, error=why)
            out.append(result)
        if self._halt is None and self._stopped_before is None and self.degraded and (
                self.status is RunStatus.SUCCEEDED):
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


async def _drain(inflight: Mapping[asyncio.Task[Any], PlanStep], *, cancel: bool) -> None:
    """Bring the steps still in flight to a known end before the error that stopped the plan goes
    on: cancelled (the run itself was cancelled) or awaited (a sibling raised)."""
    if not inflight:
        return
    if cancel:
        for task in inflight:
            task.cancel()
    await asyncio.wait(list(inflight))
    for task in inflight:
        if not task.cancelled():
            task.exception()  # retrieved here: the error on its way out is the one reported


def has_effect(tools: Mapping[str, ToolSpec], name: str) -> bool:
    """Whether a step of tool ``name`` may have an effect that ordering must protect: its tool, or
    the fallback it names, is not idempotent (an unknown tool counts as one)."""
    spec = tools.get(name)
    if spec is None or not spec.idempotent:
        return True
    fallback = tools.get(spec.fallback) if spec.fallback else None
    return spec.fallback is not None and (fallback is None or not fallback.idempotent)


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
