"""One request, top to bottom, and the durable operations on a journaled run.

principal -> budget -> memory -> planner -> plan check -> steps (executor) ->
compensation when the run aborts -> response -> memory. Every run id a
response carries is a run in the journal: a request refused before execution
(unknown principal, denied, rejected, planning failed, no budget) is journaled
with its status, reason and what planning cost.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.errors import (
    BudgetExceededError,
    ConfigError,
    PlanningError,
    PlanRejectedError,
    PluginError,
    UnknownModelPriceError,
)
from agentkeel.journal.base import Journal, RunRecord, RunState
from agentkeel.permissions.audit import AuditLog
from agentkeel.permissions.gate import visible_tools
from agentkeel.planner.check import plan_problems
from agentkeel.planner.plan import PlanTemplate, plan_from_dict
from agentkeel.runtime.compensation import Compensation, CompensationReport
from agentkeel.runtime.durable import RESUMABLE, resolve, run_duration, steps_from_journal, take
from agentkeel.runtime.executor import PlanExecutor, StepRunner, took_effect
from agentkeel.runtime.lease import HeldLease
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    CostRecord,
    Decision,
    Plan,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
)

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.plugin.facade import Plugins
    from agentkeel.tools.registry import ToolRegistry

ABORTED = (RunStatus.FAILED, RunStatus.DENIED, RunStatus.BUDGET_EXHAUSTED)


@attrs.define
class Stores:
    """The journal and the audit log, opened on first use and closed with the system."""

    config: Config
    plugins: Plugins
    _audit: AuditLog | None = None
    _journal: Journal | None = None

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            self.config.home.mkdir(parents=True, exist_ok=True)
            self._audit = AuditLog(self.config.home / "audit.jsonl")
        return self._audit

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            journal = self.plugins.hook.agentkeel_open_journal(config=self.config)
            if journal is None:
                raise PluginError("journal", "no plugin opened a journal (agentkeel_open_journal)")
            self._journal = journal
        return self._journal

    def flush(self) -> None:
        """Anchor the audit log's newest record (at the end of every request)."""
        if self._audit is not None:
            self._audit.flush()

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        if self._journal is not None:
            self._journal.close()

    def audit_decision(self, run: RunContext, tool: str, decision: Decision, args: Mapping[str, Any] | None) -> None:
        """Append a permission decision. One is made before every tool call attempt
        (``action="tool_call"``, with the argument names), so the log holds every
        call made and every call refused; what a call returned is in the journal."""
        self.audit.record(
            run_id=run.run_id,
            principal=run.principal.name,
            action="tool_call" if args is not None else "authorize",
            tool=tool,
            decision="allow" if decision.allowed else "deny",
            reason=decision.reason,
            arg_keys=tuple(args) if args else (),
        )


@attrs.define
class Pipeline:
    """What serving a request needs, built once per system."""

    config: Config
    plugins: Plugins
    tools: ToolRegistry
    templates: tuple[PlanTemplate, ...]
    runner: StepRunner
    pricer: Pricer
    stores: Stores
    owner: str
    lease_ttl_s: float

    # --- one request ----------------------------------------------------------------

    async def serve(self, request: AgentRequest) -> AgentResponse:
        """Serve one request. Failures of the request are reported in the response
        status, never raised; only bugs and invalid configuration raise."""
        started = perf_counter()
        principal = self.plugins.resolve_principal(request.user_id, self.config)
        if principal is None:
            self.stores.audit.record(
                run_id=request.run_id, principal=request.user_id, action="authenticate", tool="",
                decision="deny", reason="unknown principal", arg_keys=(),
            )
            message = f"unknown principal {request.user_id!r}: add [principals.{request.user_id}] to agentkeel.toml"
            self._refused(request, "", RunStatus.DENIED, message, None, 0.0)
            return self._respond(request, RunStatus.DENIED, started, None, (), [], message, remember=False)
        budget_usd = request.budget_usd if request.budget_usd is not None else self.config.default_budget_usd
        run = RunContext(request, principal, self.config, Budget(budget_usd), self.pricer, self.tools.as_mapping())
        run.on_refused = functools.partial(self._audit_planner_refusal, run)
        self.plugins.event("run_started", request.run_id, request=request)

        plan: Plan | None = None
        status = RunStatus.REJECTED
        config_error = False
        try:
            visible = visible_tools(principal, self.tools.as_mapping(), self.plugins.authorize)
            context = self.plugins.load_context(request, self.config)
            plan = await self.plugins.plan(request, context, visible, run, self.templates)
            if plan is None:
                raise PlanningError("no planner produced a plan for this request")
            denials = self._permission_problems(run, plan, visible)
            if denials:
                status, message = RunStatus.DENIED, "permission denied: " + "; ".join(denials)
            else:
                problems = plan_problems(plan, self.tools.as_mapping(), max_steps=self.config.max_steps)
                problems += self.plugins.check_plan(plan, visible, principal)
                estimate = sum(self.tools[s.tool_name].cost_usd for s in plan.steps if s.tool_name in self.tools)
                if estimate > run.budget.remaining_usd:
                    problems.append(
                        f"estimated tool cost ${estimate:.4f} exceeds the ${run.budget.remaining_usd:.4f} budget left"
                    )
                if problems:
                    raise PlanRejectedError(problems)
        except BudgetExceededError as exc:
            status, message = RunStatus.BUDGET_EXHAUSTED, str(exc)
        except PlanRejectedError as exc:
            status, message = RunStatus.REJECTED, str(exc)
        except (PlanningError, UnknownModelPriceError, ConfigError) as exc:
            status, message = RunStatus.FAILED, str(exc)
            config_error = isinstance(exc, (UnknownModelPriceError, ConfigError))
        else:
            if status is RunStatus.REJECTED:  # the plan passed every check: run it
                planning = sum(c.cost_usd for c in run.costs)
                lease = self.stores.journal.create_run(
                    run_id=request.run_id, user_id=request.user_id, session_id=request.session_id,
                    message=request.message, principal=principal.name, budget_usd=request.budget_usd,
                    plan=plan.to_dict(), owner=self.owner, ttl_s=self.lease_ttl_s, planning_cost_usd=planning,
                )
                with HeldLease(self.stores.journal, lease, self.lease_ttl_s) as held:
                    return await self._execute(run, plan, held, None, started)
        self._refused(request, principal.name, status, message, plan, sum(c.cost_usd for c in run.costs))
        response = self._respond(request, status, started, plan, (), run.costs, message)
        return attrs.evolve(response, config_error=config_error) if config_error else response

    def _refused(
        self, request: AgentRequest, principal: str, status: RunStatus, message: str, plan: Plan | None, cost: float
    ) -> None:
        """Journal a request refused before any step ran, so its run id can be looked up."""
        journal = self.stores.journal
        lease = journal.create_run(
            run_id=request.run_id, user_id=request.user_id, session_id=request.session_id, message=request.message,
            principal=principal, budget_usd=request.budget_usd, plan=plan.to_dict() if plan else {},
            owner=self.owner, ttl_s=self.lease_ttl_s, planning_cost_usd=cost,
        )
        with HeldLease(journal, lease, self.lease_ttl_s) as held:
            held.set_status(status, message)

    async def _execute(
        self, run: RunContext, plan: Plan, held: HeldLease, state: RunState | None, started: float
    ) -> AgentResponse:
        """Run (or resume) ``plan``; abort means compensate the steps that took effect."""
        executor = PlanExecutor(self.runner, run, held, state)
        steps = await executor.execute(plan)
        status, detail = executor.status, executor.detail
        if status in ABORTED:
            held.set_status(RunStatus.ROLLING_BACK, detail, then_status=status)
            report = await Compensation(self.runner, run, held, state).compensate(steps)
            steps = report.steps
            detail = "; ".join(p for p in (detail, report.describe()) if p)
        held.set_status(status, detail)
        message = detail or summary(status, steps)
        return self._respond(run.request, status, started, plan, steps, run.costs, message, remember=state is None)

    def _audit_planner_refusal(self, run: RunContext, tool: str, reason: str) -> None:
        self.stores.audit.record(
            run_id=run.run_id, principal=run.principal.name, action="plan", tool=tool, decision="deny",
            reason=reason, arg_keys=(),
        )

    def _permission_problems(self, run: RunContext, plan: Plan, visible: Mapping[str, ToolSpec]) -> list[str]:
        """Steps naming a registered tool the principal may not call: a denial, audited."""
        problems = []
        for step in plan.steps:
            spec = self.tools.get(step.tool_name)
            if spec is None or step.tool_name in visible:
                continue  # unknown tools are the plan check's business; visible ones are allowed
            decision = self.plugins.authorize(run.principal, spec, None)
            if not decision.allowed:
                self.stores.audit_decision(run, spec.name, decision, None)
                problems.append(f"step {step.step_id}: {decision.reason}")
        return problems

    # --- durable runs -----------------------------------------------------------------

    def _context_for(self, record: RunRecord) -> tuple[RunContext | None, AgentRequest]:
        request = AgentRequest(message=record.message, user_id=record.user_id, session_id=record.session_id,
                               budget_usd=record.budget_usd, run_id=record.run_id)
        principal = self.plugins.resolve_principal(record.user_id, self.config)
        if principal is None:
            return None, request
        budget_usd = request.budget_usd if request.budget_usd is not None else self.config.default_budget_usd
        run = RunContext(request, principal, self.config, Budget(budget_usd), self.pricer, self.tools.as_mapping())
        return run, request

    async def resume(self, run_id: str, resolutions: Mapping[int, bool] | None = None) -> AgentResponse:
        started = perf_counter()
        journal = self.stores.journal
        if journal.load(run_id).run.status not in RESUMABLE:
            return self.show(run_id)
        held, state = take(journal, self.tools, run_id, self.owner, self.lease_ttl_s)
        with held:
            if state.run.status not in RESUMABLE:  # another process finished it while we waited
                return self.show(run_id)
            if resolutions:
                for record in resolve(held, state, dict(resolutions)):
                    self.stores.audit.record(
                        run_id=run_id, principal=state.run.principal, action="resolve", tool=record.tool_name,
                        decision="happened" if record.status == "succeeded" else "not_happened",
                        reason="operator", arg_keys=tuple(record.args),
                    )
                state = journal.load(run_id)
            run, request = self._context_for(state.run)
            plan = plan_from_dict(state.run.plan)
            if run is None:
                message = f"unknown principal {state.run.user_id!r}"
                held.set_status(RunStatus.DENIED, message)
                return self._respond(request, RunStatus.DENIED, started, plan, (), [], message, remember=False)
            run.budget.record_spent(state.run.planning_cost_usd + sum(
                s.cost_usd for s in state.steps if s.phase == "outcome"))
            if state.run.status == RunStatus.ROLLING_BACK.value:
                final = RunStatus(state.run.then_status or RunStatus.FAILED.value)
                return await self._finish_rollback(run, plan, held, state, started, final, state.run.detail)
            return await self._execute(run, plan, held, state, started)

    async def rollback(self, run_id: str) -> AgentResponse:
        """Compensate the steps of a finished run that took effect, last first."""
        started = perf_counter()
        held, state = take(self.stores.journal, self.tools, run_id, self.owner, self.lease_ttl_s)
        with held:
            run, request = self._context_for(state.run)
            plan = plan_from_dict(state.run.plan)
            if state.run.status == RunStatus.ROLLED_BACK.value:
                return attrs.evolve(self.show(run_id),
                                    message=f"run {run_id} was already rolled back; nothing to do")
            if run is None:
                return self._respond(request, RunStatus.DENIED, started, plan, (), [],
                                     f"unknown principal {state.run.user_id!r}", remember=False)
            steps = steps_from_journal(plan, state)
            if not any(needs_compensation(s, self.tools) for s in steps):
                response = self.show(run_id)
                return attrs.evolve(response, message=(
                    f"nothing to roll back: no step of run {run_id} that took effect has a rollback tool "
                    f"still to run; the run stays {response.status.value}"))
            held.set_status(RunStatus.ROLLING_BACK, "rollback requested", then_status=RunStatus.ROLLED_BACK)
            return await self._finish_rollback(run, plan, held, state, started, RunStatus.ROLLED_BACK, "")

    async def _finish_rollback(
        self, run: RunContext, plan: Plan, held: HeldLease, state: RunState, started: float, final: RunStatus,
        detail: str,
    ) -> AgentResponse:
        """Compensate what is left; ``final`` is the status the run ends in when nothing stays undone
        (``rolled_back`` when a rollback was asked for, else the status the run aborted with)."""
        report: CompensationReport = await Compensation(self.runner, run, held, state).compensate(
            steps_from_journal(plan, state))
        if final is RunStatus.ROLLED_BACK and report.problems:
            status = RunStatus.FAILED  # an effect remains: the run is not rolled back
        else:
            status = final
        detail = "; ".join(p for p in (detail, report.describe()) if p)
        held.set_status(status, detail)
        return self._respond(run.request, status, started, plan, report.steps, run.costs,
                             detail or summary(status, report.steps), remember=False)

    def show(self, run_id: str) -> AgentResponse:
        """The journaled state of a run, as a response. Raises ``RunNotFoundError``."""
        state = self.stores.journal.load(run_id)
        record = state.run
        plan = plan_from_dict(record.plan) if record.plan else None
        steps = steps_from_journal(plan, state) if plan else []
        status = RunStatus(record.status)
        return AgentResponse(
            run_id=run_id, status=status, message=record.detail or summary(status, steps), plan=plan,
            steps=tuple(steps), total_cost_usd=record.planning_cost_usd + sum(s.cost_usd for s in steps),
            duration_s=run_duration(state),
        )

    # --- responses ------------------------------------------------------------------

    def _respond(
        self,
        request: AgentRequest,
        status: RunStatus,
        started: float,
        plan: Plan | None,
        steps: Iterable[StepResult],
        costs: list[CostRecord],
        message: str,
        remember: bool = True,
    ) -> AgentResponse:
        response = AgentResponse(
            run_id=request.run_id,
            status=status,
            message=message,
            plan=plan,
            steps=tuple(steps),
            costs=tuple(costs),
            total_cost_usd=sum(c.cost_usd for c in costs),
            duration_s=perf_counter() - started,
        )
        if remember:
            self.plugins.save_turn(request, response, self.config)
        self.plugins.event("run_finished", request.run_id, response=response)
        return response


def needs_compensation(step: StepResult, tools: ToolRegistry) -> bool:
    """True when ``step`` took effect (or may have) and its tool declares a rollback tool."""
    spec = tools.get(step.tool_name)
    return (took_effect(step) or step.status is StepStatus.RUNNING) and spec is not None and spec.rollback is not None


def summary(status: RunStatus, steps: Iterable[StepResult]) -> str:
    head = {RunStatus.SUCCEEDED: "Completed."}.get(status, f"Run {status.value}.")
    parts = [head]
    for s in steps:
        detail = f" ({s.error})" if s.error else ""
        parts.append(f"Step {s.step_id} ({s.tool_name}): {s.status.value}{detail}")
    return " ".join(parts)
