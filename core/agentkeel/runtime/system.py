"""``AgentSystem``: build one plugin manager and its registries, then serve requests.

Building: the plugins are loaded (``agentkeel.plugin.manager``), each plugin's
registration hooks fill the tool, template and sandbox registries, tools are
checked against each other and the sandboxes, and the configuration's per-tool
overrides are applied. Serving: ``run`` (one request, ``runtime.pipeline``),
``resume``, ``rollback``, ``show`` and ``runs`` (durable runs). Nothing below
the runtime holds a reference to the system: components get what they need.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

from agentkeel.config import Config
from agentkeel.cost.budget import Pricer
from agentkeel.errors import PluginError, ToolSpecError
from agentkeel.journal.base import Journal, RunRecord, make_owner
from agentkeel.permissions.audit import AuditLog
from agentkeel.permissions.gate import visible_tools
from agentkeel.planner.plan import PlanTemplate
from agentkeel.plugin.facade import Plugins
from agentkeel.plugin.manager import BrokenPlugin, build_plugin_manager, disable_hint
from agentkeel.runtime.executor import StepRunner
from agentkeel.runtime.pipeline import Pipeline, Stores
from agentkeel.sandbox.protocol import SandboxBackend
from agentkeel.tools.breaker import BreakerBoard
from agentkeel.tools.ratelimit import RateLimiterBoard
from agentkeel.tools.registry import ToolRegistry
from agentkeel.tools.router import ToolRouter
from agentkeel.types import AgentRequest, AgentResponse, Principal, ToolSpec


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
        self.rate_limits = RateLimiterBoard()
        call_hook = self.plugins.call_tool if self.plugins.wraps_tool_calls else None
        self.router = ToolRouter(MappingProxyType(self.sandboxes), self.breakers, self.rate_limits, call_hook)
        self.stores = Stores(self.config, self.plugins)
        # One owner per system, so two systems in one process fence each other too.
        self.owner = f"{make_owner()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = float(self.config.section("journal").get("lease_ttl_s", 30.0))
        runner = StepRunner(self.plugins, self.tools.as_mapping(), self.router, self.stores.audit_decision)
        self.pipeline = Pipeline(self.config, self.plugins, self.tools, tuple(self.templates), runner, self.pricer,
                                 self.stores, self.owner, self.lease_ttl_s)
        self._started = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- registration -----------------------------------------------------------

    def _register_all(self, tolerant: bool) -> None:
        registrars: dict[str, Callable[[str], Mapping[str, Any]]] = {
            "agentkeel_register_tools": lambda name: {"register": self.tools.register_callback(name)},
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

    async def run(self, request: AgentRequest) -> AgentResponse:
        """Serve one request. Failures of the request are reported in the response
        status, never raised; only bugs and invalid configuration raise."""
        self._check_open()
        await self.start()
        try:
            return await self.pipeline.serve(request)
        finally:
            self.pipeline.stores.flush()

    async def resume(self, run_id: str, resolve: Mapping[int, bool] | None = None) -> AgentResponse:
        """Continue a run from its journal: completed steps are not run again, a step
        that started but never finished is re-run only if its tool is retry-safe, and
        an interrupted rollback is completed.

        ``resolve`` settles in-doubt steps by an operator's word: ``{3: True}`` means
        step 3's effect happened (it is recorded as succeeded, with no result),
        ``{3: False}`` that it did not (the step runs again). Raises ``LeaseHeldError``
        when another live process is running the run, ``RunNotFoundError`` when there
        is no such run, ``AgentkeelError`` when a step to resolve is not in doubt."""
        self._check_open()
        await self.start()
        try:
            return await self.pipeline.resume(run_id, resolve)
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

    def show(self, run_id: str) -> AgentResponse:
        """The journaled state of a run, as a response. Raises ``RunNotFoundError``."""
        return self.pipeline.show(run_id)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        """Runs in the journal, newest first."""
        return self.journal.list_runs(limit)

    # --- synchronous use ----------------------------------------------------------

    def run_sync(self, request: AgentRequest) -> AgentResponse:
        """Serve one request from synchronous code. Call it as often as needed, then
        ``close()`` (or use the system as a ``with`` block)."""
        return self._sync(self.run(request))

    def resume_sync(self, run_id: str, resolve: Mapping[int, bool] | None = None) -> AgentResponse:
        """``resume`` from synchronous code."""
        return self._sync(self.resume(run_id, resolve))

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
