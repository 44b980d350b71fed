"""``AgentSystem``: build one plugin manager and its registries, then serve requests.

Building: the plugins are loaded (``agentkeel.plugin.manager``), each plugin's
registration hooks fill the tool, template and sandbox registries, tools are
checked against each other and the sandboxes, and the configuration's per-tool
overrides are applied. Serving: ``run`` and ``stream`` (one request,
``runtime.pipeline``), ``resume``, ``rollback``, ``show`` and ``runs`` (durable
runs), ``approvals`` and ``decide`` (approvals). Nothing below
the runtime holds a reference to the system: components get what they need.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

from agentkeel.config import Config
from agentkeel.cost.budget import Pricer
from agentkeel.cost.store import BudgetStore, LedgerEntry
from agentkeel.errors import ApprovalError, ConfigError, PluginError, ToolSpecError
from agentkeel.journal.base import ApprovalRecord, Journal, RunRecord, make_owner
from agentkeel.permissions.approvals import APPROVE_PERMISSION, ApprovalGate
from agentkeel.permissions.audit import AuditLog
from agentkeel.permissions.gate import visible_tools
from agentkeel.planner.plan import PlanTemplate
from agentkeel.plugin.facade import Plugins
from agentkeel.plugin.manager import BrokenPlugin, build_plugin_manager, disable_hint
from agentkeel.runtime.executor import StepRunner
from agentkeel.runtime.pipeline import Pipeline, Stores
from agentkeel.sandbox.protocol import SandboxBackend
from agentkeel.tools.breaker import BreakerBoard
from agentkeel.tools.ratelimit import RateLimiterBoard, RateLimitStore
from agentkeel.tools.registry import ToolRegistry
from agentkeel.tools.router import ToolRouter
from agentkeel.types import AgentRequest, AgentResponse, Event, Principal, ToolSpec, Usage

if TYPE_CHECKING:
    from agentkeel.tools.breaker_redis import RedisBreakerStore
    from agentkeel.tools.ratelimit_redis import RedisRateLimitStore


class AgentSystem:
    """The framework instance: load plugins once, then serve any number of requests.

    Use it as an async context manager (or call ``aclose``), or from synchronous
    code call ``run_sync`` as often as needed and then ``close``, so plugins can
    release what they hold (stores, child processes, containers).

    ``tolerant=True`` leaves out plugins that fail to load or register and lists
    them in ``broken_plugins`` instead of raising (for inspection commands).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
        tolerant: bool = False,
    ) -> None:
        self.config = config if config is not None else Config.load()
        loaded = build_plugin_manager(load_entrypoints=load_entrypoints, plugins=plugins, tolerant=tolerant)
        self.broken_plugins: list[BrokenPlugin] = loaded.broken
        self.plugins = Plugins(loaded)
        self.tools = ToolRegistry()
        self.templates: list[PlanTemplate] = []
        self._template_owners: list[tuple[str, PlanTemplate]] = []
        self.sandboxes: dict[str, SandboxBackend] = {}
        self._register_all(tolerant)
        self.tools.apply_overrides(self.config.tool_overrides, self.sandboxes)
        self.pricer = Pricer(self.plugins.model_price, self.config)
        self.breakers = BreakerBoard.from_config(self.config)
        self.shared_breakers = _shared_breakers(self.config)
        self.shared_rate_limits = _shared_rate_limits(self.config)
        self.rate_limits: RateLimitStore = self.shared_rate_limits or RateLimiterBoard()
        call_hook = self.plugins.call_tool if self.plugins.wraps_tool_calls else None
        self.router = ToolRouter(MappingProxyType(self.sandboxes), self.breakers, self.rate_limits, call_hook,
                                 shared_breakers=self.shared_breakers)
        self.stores = Stores(self.config, self.plugins)
        # One owner per system, so two systems in one process fence each other too.
        self.owner = f"{make_owner()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = float(self.config.section("journal").get("lease_ttl_s", 30.0))
        self.approval_gate = ApprovalGate(self._audit_record, self.config.approval_ttl_s)
        runner = StepRunner(self.plugins, self.tools.as_mapping(), self.router, self.stores.audit_decision,
                            self.approval_gate)
        self.pipeline = Pipeline(self.config, self.plugins, self.tools, tuple(self.templates), runner, self.pricer,
                                 self.stores, self.owner, self.lease_ttl_s)
        self._started = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- registration -----------------------------------------------------------

    def _register_all(self, tolerant: bool) -> None:
        registrars: dict[str, Callable[[str], Mapping[str, Any]]] = {
            "agentkeel_register_tools": lambda name: {"register": self.tools.register_callback(name),
                                                       "config": self.config},
            "agentkeel_register_plan_templates": lambda name: {"register": self._template_registrar(name)},
            "agentkeel_register_sandboxes": lambda name: {"register": self._sandbox_registrar(name),
                                                          "config": self.config},
        }
        for hook_name, bind in registrars.items():
            for name, exc in self.plugins.register_each(hook_name, bind):
                error = exc if isinstance(exc, PluginError) else PluginError(
                    name, f"{hook_name} raised {type(exc).__name__}: {exc}; {disable_hint(name)}")
                if not tolerant:
                    raise error from exc
                self._drop(name, str(error))
        while True:
            try:
                self.tools.validate_references()
                self.tools.check_sandboxes(self.sandboxes, self.config.tool_overrides)
                return
            except ToolSpecError as exc:
                if not tolerant:
                    raise
                self._drop(exc.plugin, str(exc))

    def _drop(self, plugin: str, error: str) -> None:
        """Tolerant mode: forget everything ``plugin`` registered and report it broken."""
        self.broken_plugins.append(BrokenPlugin(plugin, error))
        self.tools.remove_plugin(plugin)
        dropped = {id(t) for owner, t in self._template_owners if owner == plugin}
        self.templates[:] = [t for t in self.templates if id(t) not in dropped]
        found = self.plugins.pm.get_plugin(plugin)
        if found is not None:
            self.plugins.pm.unregister(found)

    def _template_registrar(self, plugin_name: str) -> Callable[[PlanTemplate], None]:
        def register(template: PlanTemplate) -> None:
            if not isinstance(template, PlanTemplate):
                raise PluginError(plugin_name, f"register() takes a PlanTemplate, got {template!r}")
            self.templates.append(template)
            self._template_owners.append((plugin_name, template))

        return register

    def _sandbox_registrar(self, plugin_name: str) -> Callable[..., None]:
        def register(name: str, backend: SandboxBackend, replace: bool = False) -> None:
            if not isinstance(name, str) or not name:
                raise PluginError(plugin_name, f"a sandbox name must be a non-empty string, got {name!r}")
            if name in self.sandboxes and not replace:
                raise PluginError(plugin_name, f"sandbox {name!r} is already registered; pass replace=True "
                                               "to replace it explicitly")
            if not (callable(getattr(backend, "run", None)) and callable(getattr(backend, "aclose", None))):
                raise PluginError(plugin_name, f"sandbox {name!r} does not implement run() and aclose()")
            strength = getattr(backend, "strength", None)
            if isinstance(strength, bool) or not isinstance(strength, int):
                raise PluginError(plugin_name, f"sandbox {name!r} must declare its isolation strength as an int "
                                               "attribute `strength` (inprocess 0, subprocess 10, docker 20)")
            self.sandboxes[name] = backend

        return register

    # --- lifecycle --------------------------------------------------------------

    def _lifecycle_args(self) -> dict[str, Any]:
        return {"config": self.config, "tools": self.tools.as_mapping(),
                "sandboxes": MappingProxyType(self.sandboxes), "system": self}

    async def start(self) -> None:
        """Run the plugins' startup hooks (done automatically by the first request)."""
        if self._started:
            return
        self._started = True
        for result in self.plugins.startup(**self._lifecycle_args()):
            if inspect.isawaitable(result):
                await result

    async def aclose(self) -> None:
        """Run the shutdown hooks, close every sandbox backend and the stores. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for result in self.plugins.shutdown(**self._lifecycle_args()):
                if inspect.isawaitable(result):
                    await result
        finally:
            for backend in self.sandboxes.values():
                await backend.aclose()
            if self.shared_breakers is not None:
                await self.shared_breakers.aclose()
            if self.shared_rate_limits is not None:
                await self.shared_rate_limits.aclose()
            self.stores.close()

    async def __aenter__(self) -> AgentSystem:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __enter__(self) -> AgentSystem:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- stores -----------------------------------------------------------------

    @property
    def journal(self) -> Journal:
        return self.stores.journal

    @property
    def audit(self) -> AuditLog:
        return self.stores.audit

    # --- requests ---------------------------------------------------------------

    def visible_tools(self, principal: Principal) -> dict[str, ToolSpec]:
        """The tools ``principal`` may call: the only ones a planner is shown."""
        return visible_tools(principal, self.tools.as_mapping(), self.plugins.authorize)

    async def run(self, request: AgentRequest, *, on_event: Callable[[Event], None] | None = None) -> AgentResponse:
        """Serve one request. Failures of the request are reported in the response
        status, never raised; only bugs and invalid configuration raise.

        ``on_event`` is called with each event of the run as it happens ("plan_ready",
        "step_started", "step_finished", "replan", "answer_delta", "answer",
        "run_finished", ...; see ``agentkeel_event``); ``stream`` is the iterator form."""
        self._check_open()
        await self.start()
        try:
            return await self.pipeline.serve(request, on_event)
        finally:
            self.pipeline.stores.flush()

    async def stream(self, request: AgentRequest) -> AsyncIterator[Event]:
        """Serve one request, yielding its events as they happen; the last is
        "run_finished", whose ``data["response"]`` is the ``AgentResponse``.

        Leaving the loop early cancels the run at its next await (a step in flight is
        then in doubt or re-run by key on ``resume``, as after a crash)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        task = asyncio.ensure_future(self.run(request, on_event=queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (event := await queue.get()) is not None:
                yield event
            task.result()  # a bug or a configuration error is raised here
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def resume(
        self,
        run_id: str,
        resolve: Mapping[int, bool] | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
    ) -> AgentResponse:
        """Continue a run from its journal: completed steps are not run again, a step
        that started but never finished is re-run only if its tool is retry-safe, an
        interrupted replan or round is planned, a waiting approval is asked again,
        and an interrupted rollback is completed.

        ``resolve`` settles in-doubt steps by an operator's word: ``{3: True}`` means
        step 3's effect happened (it is recorded as succeeded, with no result),
        ``{3: False}`` that it did not (the step runs again). Raises ``LeaseHeldError``
        when another live process is running the run, ``RunNotFoundError`` when there
        is no such run, ``AgentkeelError`` when a step to resolve is not in doubt."""
        self._check_open()
        await self.start()
        try:
            return await self.pipeline.resume(run_id, resolve, on_event)
        finally:
            self.pipeline.stores.flush()

    async def rollback(self, run_id: str) -> AgentResponse:
        """Compensate the steps of a run that took effect, last first. A run already
        rolled back, or with nothing to compensate, is left as it is and the
        response says so."""
        self._check_open()
        await self.start()
        try:
            return await self.pipeline.rollback(run_id)
        finally:
            self.pipeline.stores.flush()

    async def cancel(
        self, run_id: str, *, by: str = "", reason: str = "", on_event: Callable[[Event], None] | None = None
    ) -> AgentResponse | None:
        """Cancel a run: it stops at its next step boundary, its steps that took effect are
        compensated (last first) and it ends ``cancelled``.

        A run this system is serving now is told to stop and None is returned: the call
        serving it returns the cancelled response. A run no process is serving (waiting
        for an approval, in doubt, or left running by a process that died) is cancelled
        here, and its response returned; a finished run is left as it is (the response's
        message says so). Audited with ``by``. Raises ``RunNotFoundError`` for an unknown
        run and ``LeaseHeldError`` when another live process is serving it."""
        self._check_open()
        why = reason or (f"cancelled by {by}" if by else "cancelled on request")
        live = self.pipeline.live.get(run_id)
        principal = by or (live.principal.name if live is not None else "")
        self._audit_record(run_id=run_id, principal=principal, action="cancel", tool="", decision="allow",
                           reason=why, arg_keys=())
        if self.pipeline.request_stop(run_id, "cancel", why):
            return None
        await self.start()
        try:
            return await self.pipeline.cancel(run_id, why, on_event, by=principal)
        finally:
            self.pipeline.stores.flush()

    def request_stop(self, run_id: str, kind: str, reason: str, *, pending: bool = False) -> bool:
        """Ask a run this system serves to stop at its next step boundary: ``"cancel"`` (it
        ends ``cancelled``, compensated) or ``"pause"`` (it stays ``running``, resumable; a
        server shutting down). ``pending=True`` records the stop for a run about to start
        (a queued request). False when the run is not served here."""
        return self.pipeline.request_stop(run_id, kind, reason, pending=pending)

    def live_runs(self) -> list[str]:
        """The ids of the runs this system is serving now."""
        return list(self.pipeline.live)

    # --- costs --------------------------------------------------------------------

    @property
    def budgets(self) -> BudgetStore:
        """The cost ledger and the scoped budgets."""
        return self.stores.budgets

    def costs(self, by: str = "tier", *, user: str | None = None, since: float | None = None,
              until: float | None = None) -> list[dict[str, Any]]:
        """Spending from the ledger grouped ``by`` tier, model, tool, user, session, day,
        reason, kind, run or principal (most expensive first), for a dashboard."""
        return self.budgets.totals(by, user_id=user, since=since, until=until)

    def top_runs(self, n: int = 10, *, user: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[dict[str, Any]]:
        """The ``n`` most expensive runs in the ledger."""
        return self.budgets.top_runs(n, user_id=user, since=since, until=until)

    def cascade_report(self, *, since: float | None = None, until: float | None = None) -> dict[str, Any]:
        """How the cascade did, from the ledger's LLM rows: the share of runs served by the
        first tier alone (the hit rate), what their calls cost, and what the same tokens
        would have cost on the strongest tier (the saving)."""
        rows = [e for e in self.budgets.entries(since=since, until=until) if e.kind == "llm"]
        tiers = self.config.tiers
        first = tiers[0].name if tiers else None
        runs: dict[str, bool] = {}
        for e in rows:
            runs[e.run_id] = runs.get(e.run_id, True) and e.tier == first and e.reason != "escalation"
        spent = sum(e.cost_usd for e in rows)
        strongest = self.pricer.price(tiers[-1].model) if tiers else None
        at_strongest = sum(strongest.cost(Usage(e.input_tokens, e.output_tokens, e.cached_tokens)) for e in rows) \
            if strongest is not None else spent
        served = sum(runs.values())
        return {"runs": len(runs), "first_tier_runs": served, "hit_rate": served / len(runs) if runs else None,
                "llm_cost_usd": spent, "strongest_tier": tiers[-1].name if tiers else None,
                "strongest_tier_cost_usd": at_strongest, "saving_usd": at_strongest - spent}

    def ledger(self, *, run_id: str | None = None, user: str | None = None, since: float | None = None,
               until: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        """The ledger's rows, oldest first."""
        return self.budgets.entries(run_id=run_id, user_id=user, since=since, until=until, limit=limit)

    # --- approvals ----------------------------------------------------------------

    def approvals(self, status: str | None = "pending", limit: int = 50) -> list[ApprovalRecord]:
        """Approval requests, newest first: pending ones by default (``None``: all)."""
        return self.journal.list_approvals(status, limit)

    def decide(self, run_id: str, step_id: int, *, approver: str, approved: bool, reason: str = "") -> ApprovalRecord:
        """Approve or deny a pending approval on behalf of ``approver``, who must be a
        principal holding the ``approve`` permission and, unless ``[approvals]
        allow_self = true``, not the requester. Recorded in the journal and the audit
        log; ``resume`` then runs the step (approved) or aborts the run (denied).
        Raises ``ApprovalError`` naming what is wrong."""
        self._check_open()
        journal = self.journal
        record = journal.approval(run_id, step_id)
        if record is None:
            journal.load(run_id)  # RunNotFoundError for an unknown run
            raise ApprovalError(f"step {step_id} of run {run_id} has no approval request; "
                                "`agentkeel approvals` lists the pending ones")
        verb = "approve" if approved else "deny"
        principal = self.plugins.resolve_principal(approver, self.config)
        refusal = None
        if principal is None:
            refusal = f"{approver!r} is not a principal: add [principals.{approver}] with the approve permission"
        elif APPROVE_PERMISSION not in principal.permissions:
            refusal = f"{approver!r} does not hold the {APPROVE_PERMISSION!r} permission, so may not {verb}"
        elif approver == record.requested_by and not self.config.allow_self_approval:
            refusal = (f"{approver!r} asked for this call and may not {verb} it themselves "
                       "([approvals] allow_self = true allows that)")
        if refusal is not None:
            self._audit_record(run_id=run_id, principal=approver, action=verb, tool=record.tool_name,
                               decision="deny", reason=refusal, arg_keys=tuple(record.args))
            self.stores.flush()
            raise ApprovalError(refusal)
        try:
            decided = journal.decide_approval(run_id, step_id, approved=approved, by=approver, reason=reason)
        finally:
            self.stores.flush()
        self._audit_record(run_id=run_id, principal=approver, action=verb, tool=record.tool_name,
                           decision="allow" if approved else "deny",
                           reason=reason or f"{verb}d step {step_id} of run {run_id}", arg_keys=tuple(record.args))
        self.stores.flush()
        return decided

    def _audit_record(self, **fields: Any) -> None:
        self.stores.audit.record(**fields)

    def show(self, run_id: str) -> AgentResponse:
        """The journaled state of a run, as a response. Raises ``RunNotFoundError``."""
        return self.pipeline.show(run_id)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """Runs in the journal, newest first."""
        return self.journal.list_runs(limit)

    # --- synchronous use ----------------------------------------------------------

    def run_sync(
        self, request: AgentRequest, *, on_event: Callable[[Event], None] | None = None
    ) -> AgentResponse:
        """Serve one request from synchronous code. Call it as often as needed, then
        ``close()`` (or use the system as a ``with`` block)."""
        return self._sync(self.run(request, on_event=on_event))

    def resume_sync(
        self,
        run_id: str,
        resolve: Mapping[int, bool] | None = None,
        *,
        on_event: Callable[[Event], None] | None = None,
    ) -> AgentResponse:
        """``resume`` from synchronous code."""
        return self._sync(self.resume(run_id, resolve, on_event=on_event))

    def rollback_sync(self, run_id: str) -> AgentResponse:
        """``rollback`` from synchronous code."""
        return self._sync(self.rollback(run_id))

    def close(self) -> None:
        """Close the system from synchronous code (``aclose`` on the loop ``run_sync`` used)."""
        if self._loop is None:
            if not self._closed:
                asyncio.run(self.aclose())
            return
        try:
            self._loop.run_until_complete(self.aclose())
        finally:
            self._loop.close()
            self._loop = None

    def _sync(self, work: Coroutine[Any, Any, AgentResponse]) -> AgentResponse:
        self._check_open()
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(work)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this AgentSystem is closed; create a new one")


def _shared_breakers(config: Config) -> RedisBreakerStore | None:
    """Breakers shared by every replica when ``[shared] redis_url`` is set (``[breaker]`` thresholds)."""
    shared = config.section("shared")
    url = shared.get("redis_url")
    if not url:
        return None
    try:
        from agentkeel.tools.breaker_redis import RedisBreakerStore
    except ImportError as exc:  # pragma: no cover - the redis extra is missing
        raise ConfigError('[shared] redis_url needs Redis support: pip install "agentkeel[redis]"') from exc
    return RedisBreakerStore(str(url), failure_threshold=config.failure_threshold,
                             reset_after_s=config.reset_after_s, fail_mode=str(shared.get("fail_mode", "refuse")))


def _shared_rate_limits(config: Config) -> RedisRateLimitStore | None:
    """Rate limits shared by every replica when ``[shared] redis_url`` is set."""
    shared = config.section("shared")
    url = shared.get("redis_url")
    if not url:
        return None
    from agentkeel.tools.ratelimit_redis import RedisRateLimitStore

    return RedisRateLimitStore(str(url), fail_mode=str(shared.get("fail_mode", "refuse")))
