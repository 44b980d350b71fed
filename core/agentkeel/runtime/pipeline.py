"""One request, top to bottom, and the durable operations on a journaled run.

principal -> budget -> memory -> planner -> plan check -> steps (executor) ->
[replan after a failed step, or the next round of an adaptive plan: planner ->
the same checks -> steps, each revision journaled] -> compensation when the run
aborts -> responder (the answer) -> response -> memory. Every run id a
response carries is a run in the journal: a request refused before execution
(unknown principal, denied, rejected, planning failed, no budget) is journaled
with its status, reason and what planning cost.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.context import NO_SPAN, RunContext, Stop
from agentkeel.cost.budget import Budget, LedgerOwner, Pricer
from agentkeel.cost.scopes import scopes_for
from agentkeel.errors import (
    ApprovalError,
    BudgetExceededError,
    ConfigError,
    PlanningError,
    PlanRejectedError,
    PluginError,
    UnknownModelPriceError,
)
from agentkeel.journal.base import Journal, RunRecord, RunState
from agentkeel.logs import RUN_ID
from agentkeel.permissions.audit import AuditLog
from agentkeel.permissions.gate import visible_tools
from agentkeel.planner.check import plan_problems
from agentkeel.planner.plan import PlanTemplate
from agentkeel.responder.default import deterministic_answer
from agentkeel.runtime.compensation import Compensation, CompensationReport
from agentkeel.runtime.durable import RESUMABLE, resolve, revisions_of, run_duration, steps_from_journal, take
from agentkeel.runtime.executor import PlanExecutor, StepRunner, took_effect
from agentkeel.runtime.lease import HeldLease
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    Answer,
    ContextReport,
    CostRecord,
    Decision,
    Event,
    MemoryContext,
    Plan,
    PlanRevision,
    Principal,
    Progress,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
)

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.cost.store import BudgetStore
    from agentkeel.plugin.facade import Plugins
    from agentkeel.tools.registry import ToolRegistry

ABORTED = (RunStatus.FAILED, RunStatus.DENIED, RunStatus.BUDGET_EXHAUSTED, RunStatus.CANCELLED)
UNFINISHED = (RunStatus.WAITING, RunStatus.IN_DOUBT, RunStatus.RUNNING, RunStatus.ROLLING_BACK)
"""A run that stops in one of these is not over: its turn is remembered when it finishes."""

Sink = Callable[[Event], None]
"""A caller's listener for the events of one run (``AgentSystem.stream``)."""

log = logging.getLogger("agentkeel")


@attrs.define
class Stores:
    """The journal and the audit log, opened on first use and closed with the system."""

    config: Config
    plugins: Plugins
    _audit: AuditLog | None = None
    _journal: Journal | None = None
    _budgets: BudgetStore | None = None

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            from agentkeel.pg import store_url

            self.config.home.mkdir(parents=True, exist_ok=True)
            path = self.config.home / "audit.jsonl"
            url = store_url(self.config)
            extra = None
            if url is not None:  # the anchor also outside this replica (audit_pg; psycopg imported there)
                from agentkeel.permissions.audit_pg import PostgresAnchor

                extra = PostgresAnchor(url, path)
            self._audit = AuditLog(path, extra_anchor=extra)
        return self._audit

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            journal = self.plugins.hook.agentkeel_open_journal(config=self.config)
            if journal is None:
                raise PluginError("journal", "no plugin opened a journal (agentkeel_open_journal)")
            self._journal = journal
        return self._journal

    @property
    def budgets(self) -> BudgetStore:
        """The cost ledger and scoped budgets (``agentkeel_open_budget_store``)."""
        if self._budgets is None:
            store = self.plugins.hook.agentkeel_open_budget_store(config=self.config)
            if store is None:
                raise PluginError("cost", "no plugin opened a budget store (agentkeel_open_budget_store)")
            self._budgets = store
        return self._budgets

    def flush(self) -> None:
        """Anchor the audit log's newest record (at the end of every request)."""
        if self._audit is not None:
            self._audit.flush()

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        if self._journal is not None:
            self._journal.close()
        if self._budgets is not None:
            self._budgets.close()

    def audit_decision(self, run: RunContext, tool: str, decision: Decision, args: Mapping[str, Any] | None) -> None:
        """Append a permission decision. One is made before every tool call attempt
        (``action="tool_call"``, with the argument names), so the log holds every
        call made and every call refused; what a call returned is in the journal."""
        self.audit.append(
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
    live: dict[str, RunContext] = attrs.field(factory=dict)
    """The runs this process is serving now, by run id (``request_stop`` reaches them)."""
    pending_stops: dict[str, Stop] = attrs.field(factory=dict)
    """Stops requested for runs about to be served here (queued): taken when the run starts."""

    def request_stop(self, run_id: str, kind: str, reason: str, *, pending: bool = False) -> bool:
        """Ask a run this process serves to stop at its next step boundary (``RunContext.request_stop``);
        ``pending=True`` also records the stop for a run that has not started yet. False when
        the run is not served here (and not recorded)."""
        run = self.live.get(run_id)
        if run is not None:
            run.request_stop(kind, reason)
            return True
        if pending:
            if kind not in ("cancel", "pause"):
                raise ValueError(f"stop kind must be 'cancel' or 'pause', got {kind!r}")
            self.pending_stops[run_id] = Stop(kind, reason)
            return True
        return False

    def _run_context(self, request: AgentRequest, principal: Principal, sink: Sink | None) -> RunContext:
        config = self.config
        budget_usd = request.budget_usd if request.budget_usd is not None else config.default_budget_usd
        scopes = (scopes_for(request.user_id, request.session_id, principal.name, config, time.time())
                  if config.limits_for(principal.name) else ())
        budget = Budget(budget_usd, store=self.stores.budgets, scopes=scopes, holder=self.owner,
                        ttl_s=config.reservation_ttl_s,
                        owner=LedgerOwner(request.run_id, request.user_id, request.session_id, principal.name))
        run = RunContext(request, principal, config, budget, self.pricer, self.tools.as_mapping(),
                         observers=self.plugins.event if self.plugins.has_observers else None, sink=sink)
        run.on_refused = functools.partial(self._audit_planner_refusal, run)
        run.stop = self.pending_stops.pop(request.run_id, None)
        self.live[request.run_id] = run  # removed when serve, resume or rollback returns
        return run

    # --- one request ----------------------------------------------------------------

    async def serve(self, request: AgentRequest, sink: Sink | None = None) -> AgentResponse:
        """Serve one request. Failures of the request are reported in the response
        status, never raised; only bugs and invalid configuration raise."""
        token = RUN_ID.set(request.run_id)
        try:
            return await self._serve(request, sink)
        finally:
            self.live.pop(request.run_id, None)
            RUN_ID.reset(token)

    async def _serve(self, request: AgentRequest, sink: Sink | None) -> AgentResponse:
        started = perf_counter()
        principal = self.plugins.resolve_principal(request.user_id, self.config)
        if principal is None:
            self.stores.audit.record(
                run_id=request.run_id, principal=request.user_id, action="authenticate", tool="",
                decision="deny", reason="unknown principal", arg_keys=(),
            )
            message = f"unknown principal {request.user_id!r}: add [principals.{request.user_id}] to agentkeel.toml"
            answer = await self._answer(request, None, RunStatus.DENIED, message, None, [], MemoryContext())
            self._refused(request, "", RunStatus.DENIED, message, None, 0.0, answer.text)
            return self._respond(request, None, RunStatus.DENIED, started, [], [], message, answer, [],
                                 remember=False, sink=sink)
        run = self._run_context(request, principal, sink)
        if run.observers is not None:  # a tracing observer may fill run.trace (journaled with the run)
            run.observers("run_started", request.run_id, request=request, trace=run.trace)
        if sink is not None:
            sink(Event(kind="run_started", run_id=request.run_id, data={"request": request}))

        plan: Plan | None = None
        status = RunStatus.REJECTED
        config_error = False
        context = MemoryContext()
        try:
            _check_cancelled(run, "planning")
            exhausted = run.budget.exhausted_scope()
            if exhausted is not None:
                raise BudgetExceededError(exhausted)
            visible = self._visible(run)
            context = await self._load_context(run, visible)
            with run.span("plan", revision=1, reason="initial") as span:
                plan = await self.plugins.plan(request, context, visible, run, self.templates)
                if plan is None:
                    raise PlanningError("no planner produced a plan for this request")
                span.set(steps=len(plan.steps))
            _check_cancelled(run, "its first step")
            refusal = self._check_plan(run, plan, visible)
            if refusal is not None:
                status, message = refusal
        except _Cancelled as exc:
            status, message = RunStatus.CANCELLED, str(exc)
        except BudgetExceededError as exc:
            status, message = RunStatus.BUDGET_EXHAUSTED, str(exc)
        except PlanRejectedError as exc:
            status, message = RunStatus.REJECTED, str(exc)
        except (PlanningError, UnknownModelPriceError, ConfigError) as exc:
            status, message = RunStatus.FAILED, str(exc)
            config_error = isinstance(exc, (UnknownModelPriceError, ConfigError))
        else:
            if refusal is None:  # the plan passed every check: run it
                planning = sum(c.cost_usd for c in run.costs)
                lease = self.stores.journal.create_run(
                    run_id=request.run_id, user_id=request.user_id, session_id=request.session_id,
                    message=request.message, principal=principal.name, budget_usd=request.budget_usd,
                    plan=plan.to_dict(), owner=self.owner, ttl_s=self.lease_ttl_s, planning_cost_usd=planning,
                    context=_journaled_context(run),
                )
                with HeldLease(self.stores.journal, lease, self.lease_ttl_s) as held:
                    revisions = [PlanRevision(1, "initial", plan, planning)]
                    if run.listened:
                        run.emit("plan_ready", revision=1, reason="initial", plan=plan)
                    return await self._execute(run, context, visible, revisions, held, None, started)
        answer = await self._answer(request, run, status, message, plan, [], context)
        self._refused(request, principal.name, status, message, plan, sum(c.cost_usd for c in run.costs),
                      answer.text)
        revisions = [PlanRevision(1, "initial", plan)] if plan is not None else []
        response = self._respond(request, run, status, started, [], run.costs, message, answer, revisions)
        return attrs.evolve(response, config_error=config_error) if config_error else response

    def _visible(self, run: RunContext) -> Mapping[str, ToolSpec]:
        """The tools the run's principal may call (the permissions gate's tool-level check)."""
        with run.span("permissions", principal=run.principal.name) as span:
            visible = visible_tools(run.principal, self.tools.as_mapping(), self.plugins.authorize)
            span.set(tools_visible=len(visible), tools_registered=len(self.tools))
        return visible

    async def _load_context(self, run: RunContext, visible: Mapping[str, ToolSpec]) -> MemoryContext:
        """What the memory manager loads for the run's prompts (its report kept on the run)."""
        with run.span("memory") as span:
            context = await self.plugins.load_context(run.request, self.config, visible, run)
            run.context_report = context.report
            if context.report is not None:
                span.set(budget_tokens=context.report.budget_tokens, used_tokens=context.report.used_tokens,
                         included=len(context.report.included), dropped=len(context.report.dropped))
        return context

    def _check_plan(
        self, run: RunContext, plan: Plan, visible: Mapping[str, ToolSpec], earlier_results: Iterable[int] = ()
    ) -> tuple[RunStatus, str] | None:
        """The host's plan check, the plugins' checks, permissions and the cost estimate,
        for a first plan and every later revision alike: None when the plan may run."""
        with run.span("plan_check", steps=len(plan.steps)) as span:
            refusal = self._plan_refusal(run, plan, visible, earlier_results)
            span.set(passed=refusal is None, **({"status": refusal[0].value, "problems": refusal[1]}
                                               if refusal is not None else {}))
        return refusal

    def _plan_refusal(
        self, run: RunContext, plan: Plan, visible: Mapping[str, ToolSpec], earlier_results: Iterable[int]
    ) -> tuple[RunStatus, str] | None:
        denials = self._permission_problems(run, plan, visible)
        if denials:
            return RunStatus.DENIED, "permission denied: " + "; ".join(denials)
        problems = plan_problems(plan, self.tools.as_mapping(), max_steps=self.config.max_steps,
                                 first_step_id=plan.first_step_id, earlier_results=frozenset(earlier_results))
        problems += self.plugins.check_plan(plan, visible, run.principal)
        estimate = sum(self.tools[s.tool_name].cost_usd for s in plan.steps if s.tool_name in self.tools)
        if estimate > run.budget.remaining_usd:
            problems.append(
                f"estimated tool cost ${estimate:.4f} exceeds the ${run.budget.remaining_usd:.4f} budget left"
            )
        if problems:
            return RunStatus.REJECTED, str(PlanRejectedError(problems))
        return None

    def _refused(
        self, request: AgentRequest, principal: str, status: RunStatus, message: str, plan: Plan | None, cost: float,
        answer: str,
    ) -> None:
        """Journal a request refused before any step ran, so its run id can be looked up."""
        journal = self.stores.journal
        lease = journal.create_run(
            run_id=request.run_id, user_id=request.user_id, session_id=request.session_id, message=request.message,
            principal=principal, budget_usd=request.budget_usd, plan=plan.to_dict() if plan else {},
            owner=self.owner, ttl_s=self.lease_ttl_s, planning_cost_usd=cost,
        )
        with HeldLease(journal, lease, self.lease_ttl_s) as held:
            held.set_status(status, message, answer=answer)

    async def _execute(
        self,
        run: RunContext,
        context: MemoryContext,
        visible: Mapping[str, ToolSpec],
        revisions: list[PlanRevision],
        held: HeldLease,
        state: RunState | None,
        started: float,
    ) -> AgentResponse:
        """Run (or resume) the latest revision, then the rounds and replans it leads to;
        abort means compensate the steps of every revision that took effect."""
        executor = PlanExecutor(self.runner, run, held, state, max_parallel=self.config.max_parallel,
                                order_effects=self.config.order_effects)
        steps: dict[int, StepResult] = {}
        # A replan decided before a crash: the latest revision failed (or fails again) where it did.
        marker = False
        if state is not None:
            steps = {s.step_id: s for s in steps_from_journal([r.plan for r in revisions], state)}
            marker = state.run.status == RunStatus.RUNNING.value and state.run.then_status == "replan"
        notes: list[str] = []
        while True:
            plan = revisions[-1].plan
            for result in await executor.execute(plan):
                steps[result.step_id] = result
            status, detail = executor.status, executor.detail
            replan = status is RunStatus.FAILED and (executor.replan_step is not None or marker)
            marker = False
            reason = ""
            if replan:
                if sum(r.reason == "replan" for r in revisions) < self.config.max_replans:
                    reason = "replan"
                elif self.config.max_replans:
                    notes.append(f"no replan left ([recovery] max_replans = {self.config.max_replans})")
            elif status in (RunStatus.SUCCEEDED, RunStatus.DEGRADED) and plan.observe:
                rounds = sum(r.reason != "replan" for r in revisions)
                if rounds < self.config.max_rounds:
                    reason = "round"
                else:
                    status = RunStatus.FAILED
                    detail = (f"the planner asked for round {rounds + 1} after round {rounds}, more than the "
                              f"{self.config.max_rounds} allowed ([planner] max_rounds); the run stops here")
            if not reason:
                break
            if reason == "replan":
                if run.listened:
                    run.emit("replan", failure=detail, revision=len(revisions) + 1)
            new, why = await self._revise(run, context, visible, revisions, list(steps.values()), reason,
                                          detail if reason == "replan" else None, held)
            if new is None:
                if reason == "replan":
                    notes.append(f"replanning found no other approach: {why}")
                else:
                    status = RunStatus.FAILED
                    detail = f"round {len(revisions) + 1} could not be planned: {why}"
                break
        ordered = _superseded(sorted(steps.values(), key=lambda s: s.step_id), revisions)
        detail = "; ".join(p for p in (detail, *notes) if p)
        if status in ABORTED:
            held.set_status(RunStatus.ROLLING_BACK, detail, then_status=status)
            report = await Compensation(self.runner, run, held, state, executor.completed).compensate(ordered)
            ordered = report.steps
            detail = "; ".join(p for p in (detail, report.describe()) if p)
        return await self._finish(run, context, held, status, detail, revisions, ordered, started)

    async def _revise(
        self,
        run: RunContext,
        context: MemoryContext,
        visible: Mapping[str, ToolSpec],
        revisions: list[PlanRevision],
        steps: list[StepResult],
        reason: str,
        failure: str | None,
        held: HeldLease,
    ) -> tuple[Plan | None, str]:
        """Plan the next revision (a replan or a round), check it like a first plan and
        journal it; (None, why) when there is none to run."""
        next_id = 1 + max((s.step_id for r in revisions for s in r.plan.steps), default=0)
        progress = Progress(reason=reason, revision=len(revisions) + 1, plans=tuple(r.plan for r in revisions),
                            steps=tuple(steps), next_step_id=next_id, failure=failure)
        spent_before = sum(c.cost_usd for c in run.costs)
        try:
            with run.span("plan", revision=progress.revision, reason=reason) as span:
                plan = await self.plugins.plan(run.request, context, visible, run, self.templates, progress)
                span.set(steps=len(plan.steps) if plan is not None else 0)
            if plan is None:
                return None, "no planner had one"
            if plan.steps and plan.first_step_id != next_id:
                return None, (f"the planner numbered the new plan's steps from {plan.first_step_id}, not "
                              f"{next_id} (steps of a later revision are numbered after every earlier step)")
            refusal = self._check_plan(run, plan, visible, progress.results)
            if refusal is not None:
                return None, f"the new plan was refused ({refusal[0].value}): {refusal[1]}"
        except BudgetExceededError as exc:
            return None, f"the budget cannot cover planning it: {exc}"
        except (PlanningError, PlanRejectedError, UnknownModelPriceError, ConfigError) as exc:
            return None, str(exc)
        cost = sum(c.cost_usd for c in run.costs) - spent_before
        number = held.revise_plan(plan.to_dict(), reason, cost)
        revisions.append(PlanRevision(number, reason, plan, cost))
        if run.listened:
            run.emit("plan_ready", revision=number, reason=reason, plan=plan)
        return plan, ""

    async def _finish(
        self,
        run: RunContext,
        context: MemoryContext,
        held: HeldLease,
        status: RunStatus,
        detail: str,
        revisions: list[PlanRevision],
        steps: list[StepResult],
        started: float,
    ) -> AgentResponse:
        """Answer, journal the final status with the answer, respond."""
        plan = revisions[-1].plan
        answer = await self._answer(run.request, run, status, detail, plan, steps, context)
        held.set_status(status, detail, answer=answer.text)
        message = detail or summary(status, steps)
        return self._respond(run.request, run, status, started, steps, run.costs, message, answer, revisions,
                             remember=status not in UNFINISHED)

    async def _answer(
        self,
        request: AgentRequest,
        run: RunContext | None,
        status: RunStatus,
        detail: str,
        plan: Plan | None,
        steps: list[StepResult],
        context: MemoryContext,
    ) -> Answer:
        """The responder's answer; the deterministic one if every responder abstained or one broke."""
        shown = [attrs.evolve(s, result=None) if s.status is StepStatus.DENIED and s.result is not None else s
                 for s in steps]
        answer: Answer | None
        try:
            with run.span("respond", status=status.value) if run is not None else NO_SPAN as span:
                answer = await self.plugins.respond(request, status, detail, plan, shown, context, run)
                if answer is not None:
                    span.set(source=answer.source)
        except Exception as exc:  # noqa: BLE001 - the steps ran: a broken responder must not lose the response
            log.warning("a responder failed (%s: %s); answering without it", type(exc).__name__, exc)
            text = deterministic_answer(request, status, detail, plan, shown)
            answer = Answer(f"{text}\n(The responder failed: {type(exc).__name__}: {exc}.)", "template")
        if answer is None:
            answer = Answer(deterministic_answer(request, status, detail, plan, shown), "template")
        if run is not None and run.listened:
            run.emit("answer", text=answer.text, source=answer.source)
        return answer

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

    def _context_for(self, record: RunRecord, sink: Sink | None) -> tuple[RunContext | None, AgentRequest]:
        request = AgentRequest(message=record.message, user_id=record.user_id, session_id=record.session_id,
                               budget_usd=record.budget_usd, run_id=record.run_id)
        principal = self.plugins.resolve_principal(record.user_id, self.config)
        if principal is None:
            return None, request
        run = self._run_context(request, principal, sink)
        trace = (record.context or {}).get("trace")
        run.earlier_trace = dict(trace) if isinstance(trace, Mapping) else None
        return run, request

    async def resume(
        self, run_id: str, resolutions: Mapping[int, bool] | None = None, sink: Sink | None = None
    ) -> AgentResponse:
        token = RUN_ID.set(run_id)
        try:
            return await self._resume(run_id, resolutions, sink)
        finally:
            self.live.pop(run_id, None)
            RUN_ID.reset(token)

    async def _resume(
        self, run_id: str, resolutions: Mapping[int, bool] | None, sink: Sink | None
    ) -> AgentResponse:
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
            run, request = self._context_for(state.run, sink)
            revisions = revisions_of(state)
            if run is not None:
                run.observe("run_resumed", action="resume", request=request, earlier_trace=run.earlier_trace,
                            trace=run.trace)
            if run is None:
                message = f"unknown principal {state.run.user_id!r}"
                answer = await self._answer(request, None, RunStatus.DENIED, message, revisions[-1].plan, [],
                                            MemoryContext())
                held.set_status(RunStatus.DENIED, message, answer=answer.text)
                return self._respond(request, None, RunStatus.DENIED, started, [], [], message, answer, revisions,
                                     remember=False, sink=sink)
            # What the run spent before: the ledger's rows for it (planning included), or for a run
            # from before the ledger, the costs its journal records.
            ledgered = sum(e.cost_usd for e in self.stores.budgets.entries(run_id=run_id))
            run.budget.record_spent(ledgered or state.run.planning_cost_usd + sum(
                s.cost_usd for s in state.steps if s.phase == "outcome"))
            if state.run.status == RunStatus.ROLLING_BACK.value:
                final = RunStatus(state.run.then_status or RunStatus.FAILED.value)
                return await self._finish_rollback(run, revisions, held, state, started, final, state.run.detail)
            visible = self._visible(run)
            context = await self._load_context(run, visible)
            return await self._execute(run, context, visible, revisions, held, state, started)

    async def rollback(self, run_id: str, sink: Sink | None = None) -> AgentResponse:
        """Compensate the steps of a finished run that took effect, last first."""
        token = RUN_ID.set(run_id)
        try:
            return await self._rollback(run_id, sink)
        finally:
            self.live.pop(run_id, None)
            RUN_ID.reset(token)

    async def cancel(self, run_id: str, reason: str, sink: Sink | None = None, *, by: str = "") -> AgentResponse:
        """Cancel an unfinished run that no process is serving (waiting for an approval, in
        doubt, or left running by a process that stopped): compensate its steps that took
        effect and end it ``cancelled``. A finished run is left as it is (the response says so)."""
        token = RUN_ID.set(run_id)
        try:
            return await self._cancel(run_id, reason, sink, by or "agentkeel")
        finally:
            self.live.pop(run_id, None)
            RUN_ID.reset(token)

    async def _cancel(self, run_id: str, reason: str, sink: Sink | None, by: str) -> AgentResponse:
        started = perf_counter()
        journal = self.stores.journal
        if journal.load(run_id).run.status not in RESUMABLE:
            response = self.show(run_id)
            return attrs.evolve(response, message=f"run {run_id} has already finished "
                                                  f"({response.status.value}); nothing to cancel")
        held, state = take(journal, self.tools, run_id, self.owner, self.lease_ttl_s)
        with held:
            if state.run.status not in RESUMABLE:  # another process finished it while we waited
                return self.show(run_id)
            run, request = self._context_for(state.run, sink)
            revisions = revisions_of(state)
            if run is not None:
                run.observe("run_resumed", action="cancel", request=request, earlier_trace=run.earlier_trace,
                            trace=run.trace)
            detail = f"cancelled: {reason}"
            self._close_approvals(run_id, revisions, reason, by)
            if run is None:
                answer = Answer(deterministic_answer(request, RunStatus.CANCELLED, detail, None, []), "template")
                held.set_status(RunStatus.CANCELLED, detail, answer=answer.text)
                return self._respond(request, None, RunStatus.CANCELLED, started, [], [], detail, answer,
                                     revisions, remember=False, sink=sink)
            held.set_status(RunStatus.ROLLING_BACK, detail, then_status=RunStatus.CANCELLED)
            return await self._finish_rollback(run, revisions, held, state, started, RunStatus.CANCELLED, detail)

    def _close_approvals(self, run_id: str, revisions: Sequence[PlanRevision], reason: str, by: str) -> None:
        """A cancelled run's pending approvals are denied, so no approver is asked about them."""
        journal = self.stores.journal
        now = time.time()
        for step in (s for r in revisions for s in r.plan.steps):
            record = journal.approval(run_id, step.step_id)
            if record is not None and record.status_at(now) == "pending":
                try:
                    journal.decide_approval(run_id, step.step_id, approved=False, by=by,
                                            reason=f"the run was cancelled: {reason}")
                except ApprovalError:  # decided or expired meanwhile: nothing left to close
                    pass

    async def _rollback(self, run_id: str, sink: Sink | None) -> AgentResponse:
        started = perf_counter()
        held, state = take(self.stores.journal, self.tools, run_id, self.owner, self.lease_ttl_s)
        with held:
            run, request = self._context_for(state.run, sink)
            revisions = revisions_of(state)
            if run is not None:
                run.observe("run_resumed", action="rollback", request=request, earlier_trace=run.earlier_trace,
                            trace=run.trace)
            if state.run.status == RunStatus.ROLLED_BACK.value:
                return attrs.evolve(self.show(run_id),
                                    message=f"run {run_id} was already rolled back; nothing to do")
            if run is None:
                message = f"unknown principal {state.run.user_id!r}"
                answer = Answer(deterministic_answer(request, RunStatus.DENIED, message, None, []), "template")
                return self._respond(request, None, RunStatus.DENIED, started, [], [], message, answer, revisions,
                                     remember=False, sink=sink)
            steps = steps_from_journal([r.plan for r in revisions], state)
            if not any(needs_compensation(s, self.tools) for s in steps):
                response = self.show(run_id)
                return attrs.evolve(response, message=(
                    f"nothing to roll back: no step of run {run_id} that took effect has a rollback tool "
                    f"still to run; the run stays {response.status.value}"))
            held.set_status(RunStatus.ROLLING_BACK, "rollback requested", then_status=RunStatus.ROLLED_BACK)
            return await self._finish_rollback(run, revisions, held, state, started, RunStatus.ROLLED_BACK, "")

    async def _finish_rollback(
        self, run: RunContext, revisions: list[PlanRevision], held: HeldLease, state: RunState, started: float,
        final: RunStatus, detail: str,
    ) -> AgentResponse:
        """Compensate what is left; ``final`` is the status the run ends in when nothing stays undone
        (``rolled_back`` when a rollback was asked for, else the status the run aborted with)."""
        steps = _superseded(steps_from_journal([r.plan for r in revisions], state), revisions)
        report: CompensationReport = await Compensation(self.runner, run, held, state).compensate(steps)
        if final is RunStatus.ROLLED_BACK and report.problems:
            status = RunStatus.FAILED  # an effect remains: the run is not rolled back
        else:
            status = final
        detail = "; ".join(p for p in (detail, report.describe()) if p)
        plan = revisions[-1].plan
        answer = await self._answer(run.request, run, status, detail, plan, report.steps, MemoryContext())
        held.set_status(status, detail, answer=answer.text)
        return self._respond(run.request, run, status, started, report.steps, run.costs,
                             detail or summary(status, report.steps), answer, revisions, remember=False)

    def show(self, run_id: str) -> AgentResponse:
        """The journaled state of a run, as a response. Raises ``RunNotFoundError``."""
        state = self.stores.journal.load(run_id)
        record = state.run
        revisions = revisions_of(state) if record.plan else []
        steps = _superseded(steps_from_journal([r.plan for r in revisions], state), revisions) if revisions else []
        status = RunStatus(record.status)
        return AgentResponse(
            run_id=run_id, status=status, message=record.detail or summary(status, steps),
            plan=revisions[-1].plan if revisions else None,
            steps=tuple(steps), total_cost_usd=record.planning_cost_usd + sum(s.cost_usd for s in steps),
            duration_s=run_duration(state), answer=record.answer, revisions=tuple(revisions),
            context=ContextReport.from_dict(record.context) if record.context and "budget_tokens" in record.context
            else None,
        )

    # --- responses ------------------------------------------------------------------

    def _respond(
        self,
        request: AgentRequest,
        run: RunContext | None,
        status: RunStatus,
        started: float,
        steps: Iterable[StepResult],
        costs: list[CostRecord],
        message: str,
        answer: Answer,
        revisions: list[PlanRevision],
        remember: bool = True,
        sink: Sink | None = None,
    ) -> AgentResponse:
        response = AgentResponse(
            run_id=request.run_id,
            status=status,
            message=message,
            plan=revisions[-1].plan if revisions else None,
            steps=tuple(steps),
            costs=tuple(costs),
            total_cost_usd=sum(c.cost_usd for c in costs),
            duration_s=perf_counter() - started,
            answer=answer.text,
            answer_source=answer.source,
            revisions=tuple(revisions),
            context=run.context_report if run is not None else None,
        )
        if remember:
            self.plugins.save_turn(request, response, self.config)
        if run is not None:
            run.emit("run_finished", response=response)
        else:
            self.plugins.event("run_finished", request.run_id, response=response)
            if sink is not None:
                sink(Event(kind="run_finished", run_id=request.run_id, data={"response": response}))
        return response


def _journaled_context(run: RunContext) -> dict[str, Any] | None:
    """What the journal keeps of a run's context: its memory report and, under ``trace``, the
    trace context a tracing plugin put in ``run.trace`` (so a resumed run can link to it)."""
    context = run.context_report.to_dict() if run.context_report is not None else {}
    if run.trace:
        context["trace"] = dict(run.trace)
    return context or None


class _Cancelled(Exception):
    """A cancel reached a run before anything of it was journaled."""


def _check_cancelled(run: RunContext, before: str) -> None:
    if run.stop is not None and run.stop.kind == "cancel":
        raise _Cancelled(f"cancelled before {before}: {run.stop.reason}")


def _superseded(steps: list[StepResult], revisions: Sequence[PlanRevision]) -> list[StepResult]:
    """Steps of an earlier revision that never ran, labelled as replaced by the revision after it."""
    if len(revisions) < 2:
        return steps
    replaced_by = {s.step_id: number + 1 for number, r in enumerate(revisions[:-1], start=1) for s in r.plan.steps}
    out = []
    for step in steps:
        later = replaced_by.get(step.step_id)
        if later is not None and (step.status is StepStatus.PENDING or (
                step.status is StepStatus.SKIPPED and (step.error or "").startswith("not run: run stopped"))):
            step = attrs.evolve(step, status=StepStatus.SKIPPED, error=f"not run: replaced by plan revision {later}")
        out.append(step)
    return out


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
