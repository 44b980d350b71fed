"""``AgentSystem``: one plugin manager, its registries, and the request pipeline.

A request goes: principal -> budget -> memory -> planner -> plan check ->
steps (``agentkeel.runtime.executor``) -> memory -> response.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Iterable, Mapping
from time import perf_counter
from types import TracebackType
from typing import Any

import attrs

from agentkeel.permissions.audit import AuditLog
from agentkeel.tools.breaker import BreakerBoard
from agentkeel.planner.check import plan_problems
from agentkeel.config import Config
from agentkeel.context import RunContext
from agentkeel.cost.budget import Budget, Pricer
from agentkeel.errors import (
    AgentkeelError,
    BudgetExceededError,
    PlanningError,
    PlanRejectedError,
    PluginError,
    UnknownModelPriceError,
)
from agentkeel.runtime.executor import PlanExecutor, step_result_from_record
from agentkeel.journal.base import Journal, Lease, RunRecord, RunState, StepRecord, make_owner
from agentkeel.planner.plan import PlanTemplate, plan_from_dict
from agentkeel.plugin.manager import Plugins, build_plugin_manager
from agentkeel.tools.ratelimit import RateLimiterBoard
from agentkeel.runtime.compensation import Rollback
from agentkeel.sandbox.protocol import SandboxBackend
from agentkeel.tools.decorator import ToolRegistry
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    Decision,
    Plan,
    RunStatus,
    StepResult,
    StepStatus,
    ToolSpec,
)


class AgentSystem:
    """The framework instance: load plugins once, then serve requests with ``run``.

    Use it as an async context manager (or call ``aclose``) so plugins can release
    what they hold (stores, warm containers).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
    ) -> None:
        self.config = config if config is not None else Config.load()
        self.plugins = Plugins(build_plugin_manager(load_entrypoints=load_entrypoints, plugins=plugins))
        self.tools = ToolRegistry()
        for plugin_name, impl in self.plugins.each_impl("agentkeel_register_tools"):
            _call_registration(plugin_name, impl, register=self.tools.register_callback(plugin_name))
        self.tools.validate_references()
        self.tools.apply_overrides(self.config.tool_overrides)
        self.templates: list[PlanTemplate] = []
        for plugin_name, impl in self.plugins.each_impl("agentkeel_register_plan_templates"):
            _call_registration(plugin_name, impl, register=self._template_registrar(plugin_name))
        self.sandboxes: dict[str, SandboxBackend] = {}
        for plugin_name, impl in self.plugins.each_impl("agentkeel_register_sandboxes"):
            _call_registration(plugin_name, impl, register=self._sandbox_registrar(plugin_name), config=self.config)
        for spec in self.tools.all().values():
            if spec.isolation not in self.sandboxes:
                raise PluginError(
                    spec.plugin, f"tool {spec.name!r} needs the {spec.isolation!r} sandbox, which no plugin provides"
                )
        self.pricer = Pricer(self.plugins, self.config)
        self.breakers = BreakerBoard.from_config(self.config)
        self.rate_limits = RateLimiterBoard()
        self._audit: AuditLog | None = None
        self._journal: Journal | None = None
        # One owner per system, so two systems in one process fence each other too.
        self.owner = f"{make_owner()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = float(self.config.section("journal").get("lease_ttl_s", 30.0))
        self._started = False
        self._closed = False

    # --- registration callbacks -------------------------------------------------

    def _template_registrar(self, plugin_name: str) -> Any:
        def register(template: PlanTemplate) -> None:
            if not isinstance(template, PlanTemplate):
                raise PluginError(plugin_name, f"register() takes a PlanTemplate, got {template!r}")
            self.templates.append(template)

        return register

    def _sandbox_registrar(self, plugin_name: str) -> Any:
        def register(name: str, backend: SandboxBackend) -> None:
            if name in self.sandboxes:
                raise PluginError(plugin_name, f"sandbox {name!r} is already registered")
            if not isinstance(backend, SandboxBackend):
                raise PluginError(plugin_name, f"sandbox {name!r} does not implement run() and aclose()")
            self.sandboxes[name] = backend

        return register

    # --- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Run the plugins' startup hooks (done automatically by the first ``run``)."""
        if self._started:
            return
        self._started = True
        for result in self.plugins.startup(self):
            if inspect.isawaitable(result):
                await result

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for result in self.plugins.shutdown(self):
            if inspect.isawaitable(result):
                await result
        for backend in self.sandboxes.values():
            await backend.aclose()
        if self._audit is not None:
            self._audit.close()
        if self._journal is not None:
            self._journal.close()

    async def __aenter__(self) -> AgentSystem:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    # --- audit ------------------------------------------------------------------

    @property
    def audit(self) -> AuditLog:
        if self._audit is None:
            self.config.home.mkdir(parents=True, exist_ok=True)
            self._audit = AuditLog(self.config.home / "audit.jsonl")
        return self._audit

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

    # --- requests ---------------------------------------------------------------

    def visible_tools(self, run: RunContext) -> dict[str, ToolSpec]:
        """The tools ``run.principal`` may call: the only ones a planner is shown."""
        return {
            name: spec
            for name, spec in self.tools.all().items()
            if self.plugins.authorize(run.principal, spec, None).allowed
        }

    async def run(self, request: AgentRequest) -> AgentResponse:
        """Serve one request. Failures of the request are reported in the response
        status, never raised; only bugs and invalid configuration raise."""
        started = perf_counter()
        await self.start()
        principal = self.plugins.resolve_principal(request.user_id, self.config)
        if principal is None:
            self.audit.record(
                run_id=request.run_id, principal=request.user_id, action="authenticate", tool="",
                decision="deny", reason="unknown principal", arg_keys=(),
            )
            message = f"unknown principal {request.user_id!r}: add [principals.{request.user_id}] to agentkeel.toml"
            return self._respond(request, RunStatus.DENIED, started, None, (), [], message, remember=False)
        budget_usd = request.budget_usd if request.budget_usd is not None else self.config.default_budget_usd
        run = RunContext(request, principal, self.config, Budget(budget_usd), self.pricer, self)
        self.plugins.event("run_started", request.run_id, request=request)

        plan: Plan | None = None
        try:
            visible = self.visible_tools(run)
            plan = await self._plan(run, visible)
            denials = self._permission_problems(run, plan, visible)
            if denials:
                return self._respond(request, RunStatus.DENIED, started, plan, (), run.costs,
                                     "permission denied: " + "; ".join(denials))
            problems = plan_problems(plan, self.tools.all()) or self.plugins.check_plan(plan, visible, principal)
            estimate = sum(self.tools[s.tool_name].cost_usd for s in plan.steps if s.tool_name in self.tools)
            if estimate > run.budget.remaining_usd:
                problems.append(
                    f"estimated tool cost ${estimate:.4f} exceeds the ${run.budget.remaining_usd:.4f} budget left"
                )
            if problems:
                raise PlanRejectedError(problems)
        except BudgetExceededError as exc:
            return self._respond(request, RunStatus.BUDGET_EXHAUSTED, started, plan, (), run.costs, str(exc))
        except PlanRejectedError as exc:
            return self._respond(request, RunStatus.REJECTED, started, plan, (), run.costs, str(exc))
        except (PlanningError, UnknownModelPriceError) as exc:
            return self._respond(request, RunStatus.FAILED, started, plan, (), run.costs, str(exc))

        lease = self.journal.create_run(
            run_id=request.run_id, user_id=request.user_id, session_id=request.session_id,
            message=request.message, principal=principal.name, budget_usd=request.budget_usd,
            plan=plan.to_dict(), owner=self.owner, ttl_s=self.lease_ttl_s,
        )
        return await self._execute(run, plan, lease, None, started)

    async def _execute(
        self, run: RunContext, plan: Plan, lease: Lease, state: RunState | None, started: float
    ) -> AgentResponse:
        """Run (or resume) ``plan`` under ``lease``; abort means compensate completed steps."""
        executor = PlanExecutor(self, run, self.journal, lease, state)
        try:
            steps = await executor.execute(plan)
            status, detail = executor.status, executor.detail
            if status in _ABORTED:
                self.journal.set_status(executor.lease, RunStatus.ROLLING_BACK.value, detail)
                steps, detail = await self._compensate(run, executor.lease, state, steps, detail)
            self.journal.set_status(executor.lease, status.value, detail)
        finally:
            self.journal.release(executor.lease)
        message = detail or _summary(status, steps)
        return self._respond(run.request, status, started, plan, steps, run.costs, message, remember=state is None)

    async def _compensate(
        self, run: RunContext, lease: Lease, state: RunState | None, steps: list[StepResult], detail: str
    ) -> tuple[list[StepResult], str]:
        rollback = Rollback(self, run, self.journal, lease, state)
        steps = await rollback.compensate(steps)
        if rollback.problems:
            detail += "; rollback incomplete: " + "; ".join(rollback.problems)
        elif any(s.status is StepStatus.COMPENSATED for s in steps):
            done = ", ".join(str(s.step_id) for s in reversed(steps) if s.status is StepStatus.COMPENSATED)
            detail += f"; rolled back step(s) {done}"
        return steps, detail

    # --- durable runs -----------------------------------------------------------

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            journal = self.plugins.hook.agentkeel_open_journal(config=self.config)
            if journal is None:
                raise PluginError("journal", "no plugin opened a journal (agentkeel_open_journal)")
            self._journal = journal
        return self._journal

    def _context_for(self, record: RunRecord) -> tuple[RunContext | None, AgentRequest]:
        request = AgentRequest(message=record.message, user_id=record.user_id, session_id=record.session_id,
                               budget_usd=record.budget_usd, run_id=record.run_id)
        principal = self.plugins.resolve_principal(record.user_id, self.config)
        if principal is None:
            return None, request
        budget_usd = request.budget_usd if request.budget_usd is not None else self.config.default_budget_usd
        budget = Budget(budget_usd)
        return RunContext(request, principal, self.config, budget, self.pricer, self), request

    async def resume(self, run_id: str, resolve: Mapping[int, bool] | None = None) -> AgentResponse:
        """Continue a run from its journal: completed steps are not run again, a step
        that started but never finished is re-run only if its tool is retry-safe, and
        an interrupted rollback is completed.

        ``resolve`` settles in-doubt steps by an operator's word: ``{3: True}`` means
        step 3's effect happened (it is recorded as succeeded, with no result),
        ``{3: False}`` that it did not (the step runs again). Raises ``LeaseHeldError``
        when another live process is running the run, ``RunNotFoundError`` when there
        is no such run, ``AgentkeelError`` when a step to resolve is not in doubt."""
        started = perf_counter()
        await self.start()
        if self.journal.load(run_id).run.status not in _RESUMABLE:
            return self.show(run_id)
        lease, state = self._take(run_id)
        record = state.run
        if record.status not in _RESUMABLE:  # another process finished it while we waited
            self.journal.release(lease)
            return self.show(run_id)
        if resolve:
            try:
                self._resolve(lease, state, resolve)
            except BaseException:
                self.journal.release(lease)
                raise
            state = self.journal.load(run_id)
        run, request = self._context_for(state.run)
        plan = plan_from_dict(state.run.plan)
        if run is None:
            self.journal.set_status(lease, RunStatus.DENIED.value, f"unknown principal {record.user_id!r}")
            self.journal.release(lease)
            return self._respond(request, RunStatus.DENIED, started, plan, (), [],
                                 f"unknown principal {record.user_id!r}", remember=False)
        run.budget.record_spent(sum(s.cost_usd for s in state.steps if s.phase == "outcome"))
        if state.run.status == RunStatus.ROLLING_BACK.value:
            final = RunStatus(_aborted_status(state))
            return await self._finish_rollback(run, plan, lease, state, started, final, state.run.detail)
        return await self._execute(run, plan, lease, state, started)

    def _take(self, run_id: str) -> tuple[Lease, RunState]:
        """Lease a journaled run for this process; the state is read after the lease is held."""
        lease = self.journal.acquire(run_id, self.owner, self.lease_ttl_s)  # LeaseHeldError first
        state = self.journal.load(run_id)  # what the previous holder wrote before losing the lease
        plan = plan_from_dict(state.run.plan)
        needed = {s.tool_name for s in plan.steps} | {r.tool_name for r in state.steps}
        needed |= {spec.rollback for name in needed if (spec := self.tools.get(name)) and spec.rollback}
        missing = sorted(name for name in needed if name not in self.tools)
        if missing:
            self.journal.release(lease)
            raise AgentkeelError(
                f"run {run_id} needs tools that no loaded plugin provides: {', '.join(missing)}; install or "
                "enable the plugins that register them (see `agentkeel tools`), then try again"
            )
        return lease, state

    def _resolve(self, lease: Lease, state: RunState, resolve: Mapping[int, bool]) -> None:
        for step_id, happened in resolve.items():
            intent, outcome = state.forward(step_id)
            if intent is None or outcome is not None:
                raise AgentkeelError(f"step {step_id} of run {state.run.run_id} is not in doubt; nothing to resolve")
            status = StepStatus.SUCCEEDED if happened else StepStatus.PENDING
            note = "it happened" if happened else "it did not happen; run it again"
            self.journal.outcome(lease, StepRecord(
                step_id, "forward", "outcome", intent.tool_name, intent.args, intent.idempotency_key,
                status.value, None, f"resolved by an operator: {note}",
            ))
            self.audit.record(
                run_id=state.run.run_id, principal=state.run.principal, action="resolve", tool=intent.tool_name,
                decision="happened" if happened else "not_happened", reason="operator", arg_keys=tuple(intent.args),
            )

    async def rollback(self, run_id: str) -> AgentResponse:
        """Compensate the completed steps of a finished run, last first."""
        started = perf_counter()
        await self.start()
        lease, state = self._take(run_id)  # refuses a live holder
        run, request = self._context_for(state.run)
        plan = plan_from_dict(state.run.plan)
        if run is None:
            self.journal.release(lease)
            return self._respond(request, RunStatus.DENIED, started, plan, (), [],
                                 f"unknown principal {state.run.user_id!r}", remember=False)
        self.journal.set_status(lease, RunStatus.ROLLING_BACK.value, "rollback requested")
        return await self._finish_rollback(run, plan, lease, state, started, RunStatus.ROLLED_BACK,
                                           "rollback requested")

    async def _finish_rollback(
        self, run: RunContext, plan: Plan, lease: Lease, state: RunState, started: float, final: RunStatus,
        detail: str,
    ) -> AgentResponse:
        steps = steps_from_journal(plan, state)
        try:
            steps, detail = await self._compensate(run, lease, state, steps, detail)
            status = RunStatus.FAILED if "rollback incomplete" in detail and final is RunStatus.ROLLED_BACK else final
            self.journal.set_status(lease, status.value, detail)
        finally:
            self.journal.release(lease)
        return self._respond(run.request, status, started, plan, steps, run.costs,
                             detail or _summary(status, steps), remember=False)

    def show(self, run_id: str) -> AgentResponse:
        """The journaled state of a run, as a response. Raises ``RunNotFoundError``."""
        state = self.journal.load(run_id)
        record = state.run
        plan = plan_from_dict(record.plan)
        steps = steps_from_journal(plan, state)
        status = RunStatus(record.status)
        return AgentResponse(
            run_id=run_id, status=status, message=record.detail or _summary(status, steps), plan=plan,
            steps=tuple(steps), total_cost_usd=sum(s.cost_usd for s in steps),
            duration_s=max(0.0, record.updated_at - record.created_at),
        )

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """Runs in the journal, newest first."""
        return self.journal.list_runs(limit)

    async def _plan(self, run: RunContext, visible: dict[str, ToolSpec]) -> Plan:
        context = self.plugins.load_context(run.request, self.config)
        planned = self.plugins.plan(run.request, context, visible, run)
        if inspect.isawaitable(planned):
            planned = await planned
        if planned is None:
            raise PlanningError("no planner produced a plan for this request")
        return planned

    def _permission_problems(self, run: RunContext, plan: Plan, visible: Mapping[str, ToolSpec]) -> list[str]:
        """Steps naming a registered tool the principal may not call: a denial, audited."""
        problems = []
        for step in plan.steps:
            spec = self.tools.get(step.tool_name)
            if spec is None or step.tool_name in visible:
                continue  # unknown tools are the plan check's business; visible ones are allowed
            decision = self.plugins.authorize(run.principal, spec, None)
            if not decision.allowed:
                self.audit_decision(run, spec.name, decision, None)
                problems.append(f"step {step.step_id}: {decision.reason}")
        return problems

    def _respond(
        self,
        request: AgentRequest,
        status: RunStatus,
        started: float,
        plan: Plan | None,
        steps: Iterable[StepResult],
        costs: list[Any],
        message: str,
        remember: bool = True,
    ) -> AgentResponse:
        steps = tuple(steps)
        response = AgentResponse(
            run_id=request.run_id,
            status=status,
            message=message,
            plan=plan,
            steps=steps,
            costs=tuple(costs),
            total_cost_usd=sum(c.cost_usd for c in costs),
            duration_s=perf_counter() - started,
        )
        if remember:
            self.plugins.save_turn(request, response, self.config)
        self.plugins.event("run_finished", request.run_id, response=response)
        return response

    def run_sync(self, request: AgentRequest) -> AgentResponse:
        """Run one request to completion from synchronous code, then close the system."""
        import asyncio

        async def main() -> AgentResponse:
            async with self:
                return await self.run(request)

        return asyncio.run(main())


def _call_registration(plugin_name: str, impl: Any, **kwargs: Any) -> None:
    accepted = inspect.signature(impl).parameters
    try:
        impl(**{k: v for k, v in kwargs.items() if k in accepted})
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(plugin_name, f"{impl.__name__} raised {type(exc).__name__}: {exc}") from exc


_ABORTED = (RunStatus.FAILED, RunStatus.DENIED, RunStatus.BUDGET_EXHAUSTED)
_RESUMABLE = (RunStatus.RUNNING.value, RunStatus.WAITING.value, RunStatus.IN_DOUBT.value,
              RunStatus.ROLLING_BACK.value)


def _aborted_status(state: RunState) -> str:
    """The status a run that was rolling back will end in: failed unless it was asked for."""
    return RunStatus.ROLLED_BACK.value if state.run.detail.startswith("rollback requested") else RunStatus.FAILED.value


def steps_from_journal(plan: Plan, state: RunState) -> list[StepResult]:
    """Each step of ``plan`` as the journal last recorded it (pending when never run)."""
    out = []
    for step in plan.steps:
        intent, outcome = state.forward(step.step_id)
        if outcome is not None:
            result = step_result_from_record(outcome)
            _, undo = state.compensation(step.step_id)
            if undo is not None and undo.status == StepStatus.SUCCEEDED.value:
                result = attrs.evolve(result, status=StepStatus.COMPENSATED)
        elif intent is not None:
            result = StepResult(step.step_id, intent.tool_name, StepStatus.RUNNING, intent.args,
                                error="started; no outcome recorded")
        else:
            result = StepResult(step.step_id, step.tool_name, StepStatus.PENDING, step.tool_args)
        out.append(result)
    return out


def _summary(status: RunStatus, steps: list[StepResult]) -> str:
    head = {RunStatus.SUCCEEDED: "Completed."}.get(status, f"Run {status.value}.")
    parts = [head]
    for s in steps:
        detail = f" ({s.error})" if s.error else ""
        parts.append(f"Step {s.step_id} ({s.tool_name}): {s.status.value}{detail}")
    return " ".join(parts)
