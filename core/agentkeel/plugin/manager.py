"""Plugin loading and the typed facade over ``pm.hook``.

Default components are plugins listed in ``DEFAULT_PLUGINS`` and registered
exactly like third-party ones; pip-installed plugins come from the
``agentkeel`` entry-point group. Environment controls:

- ``AGENTKEEL_LOAD_PLUGINS=a,b``: load only these entry-point plugins.
- ``AGENTKEEL_DISABLE_PLUGINS=a,b``: block these plugins, default ones included
  (e.g. ``memory_sqlite`` to run without memory).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

from agentkeel import hookspecs
from agentkeel.errors import PluginError
from agentkeel.markers import PROJECT_NAME
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    Decision,
    Event,
    MemoryContext,
    ModelPrice,
    Plan,
    PlanStep,
    Principal,
    RecoveryDecision,
    ToolSpec,
    Verdict,
)

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.context import RunContext

DEFAULT_PLUGINS: tuple[str, ...] = (
    "agentkeel.permissions.default",
    "agentkeel.cost.pricing",
    "agentkeel.memory.sqlite",
    "agentkeel.journal.default",
    "agentkeel.planner.rules",
    "agentkeel.planner.llm",
    "agentkeel.sandbox.inprocess",
    "agentkeel.sandbox.subprocess.backend",
    "agentkeel.sandbox.docker.plugin",
    "agentkeel.evaluator.default",
    "agentkeel.recovery.default",
)


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def short_name(module_name: str) -> str:
    return module_name.rsplit(".", 1)[-1]


def build_plugin_manager(
    *, load_entrypoints: bool = True, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    """A fresh plugin manager: hookspecs, default plugins, entry points, then ``plugins``.

    Raises ``PluginError`` naming the plugin that failed to import, registered a
    hook with a bad signature, or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    blocked = _env_list("AGENTKEEL_DISABLE_PLUGINS") or set()
    for name in blocked:
        pm.set_blocked(name)
    for module_name in DEFAULT_PLUGINS:
        name = short_name(module_name)
        if name in blocked:
            continue
        _register(pm, importlib.import_module(module_name), name)
    if load_entrypoints:
        _load_entrypoints(pm, blocked)
    for plugin in plugins:
        _register(pm, plugin, None)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(pm.get_name(exc.plugin) or repr(exc.plugin), str(exc)) from exc
    return pm


def _register(pm: pluggy.PluginManager, plugin: object, name: str | None) -> None:
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        raise PluginError(name or _plugin_label(plugin), str(exc)) from exc
    except ValueError as exc:
        raise PluginError(name or _plugin_label(plugin), str(exc)) from exc


def _plugin_label(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=PROJECT_NAME))


def _load_entrypoints(pm: pluggy.PluginManager, blocked: set[str]) -> None:
    allowed = _env_list("AGENTKEEL_LOAD_PLUGINS")
    if allowed is not None:
        for ep in _entry_points():
            if ep.name not in allowed:
                pm.set_blocked(ep.name)
    try:
        pm.load_setuptools_entrypoints(PROJECT_NAME)
    except Exception as exc:
        culprit = next(
            (ep for ep in _entry_points() if not pm.is_registered(pm.get_plugin(ep.name)) and not pm.is_blocked(ep.name)),
            None,
        )
        name = culprit.name if culprit else "unknown"
        where = f" ({culprit.value})" if culprit else ""
        raise PluginError(name, f"failed to load{where}: {type(exc).__name__}: {exc}") from exc


class Plugins:
    """Typed facade over ``pm.hook``: call sites get checked arguments and return types."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.hook = pm.hook
        self.has_observers = bool(pm.hook.agentkeel_event.get_hookimpls())

    # --- registration -----------------------------------------------------------

    def each_impl(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        """(plugin name, implementation) for a registration hook, in call order."""
        caller = getattr(self.hook, hook_name)
        return [
            (impl.plugin_name, impl.function)
            for impl in reversed(caller.get_hookimpls())
            if not (impl.wrapper or impl.hookwrapper)
        ]

    # --- lifecycle --------------------------------------------------------------

    def startup(self, system: Any) -> list[Any]:
        return list(self.hook.agentkeel_startup(system=system))

    def shutdown(self, system: Any) -> list[Any]:
        return list(self.hook.agentkeel_shutdown(system=system))

    # --- permissions ------------------------------------------------------------

    def resolve_principal(self, user_id: str, config: Config) -> Principal | None:
        result: Principal | None = self.hook.agentkeel_resolve_principal(user_id=user_id, config=config)
        return result

    def authorize(self, principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None) -> Decision:
        """Combine every decision: allowed only if someone allows and nobody denies."""
        decisions: list[Decision] = self.hook.agentkeel_authorize(principal=principal, tool=tool, args=args)
        allowed: Decision | None = None
        waiting: Decision | None = None
        for decision in decisions:
            if decision.allowed:
                allowed = allowed or decision
            elif decision.wait:
                waiting = waiting or decision
            else:
                return decision
        if waiting is not None:
            return waiting
        return allowed or Decision(False, "no permissions plugin allowed the call (deny by default)")

    # --- cost -------------------------------------------------------------------

    def model_price(self, model: str, config: Config) -> ModelPrice | None:
        result: ModelPrice | None = self.hook.agentkeel_model_price(model=model, config=config)
        return result

    # --- memory -----------------------------------------------------------------

    def load_context(self, request: AgentRequest, config: Config) -> MemoryContext:
        result = self.hook.agentkeel_load_context(request=request, config=config)
        return result if result is not None else MemoryContext()

    def save_turn(self, request: AgentRequest, response: AgentResponse, config: Config) -> None:
        self.hook.agentkeel_save_turn(request=request, response=response, config=config)

    # --- planner ----------------------------------------------------------------

    def plan(
        self, request: AgentRequest, context: MemoryContext, tools: Mapping[str, ToolSpec], run: RunContext
    ) -> Plan | Awaitable[Plan] | None:
        result: Plan | Awaitable[Plan] | None = self.hook.agentkeel_plan(
            request=request, context=context, tools=tools, run=run
        )
        return result

    def check_plan(self, plan: Plan, tools: Mapping[str, ToolSpec], principal: Principal) -> list[str]:
        problems: list[str] = []
        for found in self.hook.agentkeel_check_plan(plan=plan, tools=tools, principal=principal):
            problems.extend(found)
        return problems

    # --- evaluator --------------------------------------------------------------

    def evaluate(self, step: PlanStep, tool: ToolSpec, result: Any) -> Verdict:
        verdicts: list[Verdict] = self.hook.agentkeel_evaluate(step=step, tool=tool, result=result)
        if not verdicts:
            return _PASS
        failed = [v for v in verdicts if not v.passed]
        if failed:
            return Verdict(False, min(v.score for v in verdicts), "; ".join(v.reason for v in failed))
        if len(verdicts) == 1:
            return verdicts[0]
        return Verdict(True, min(v.score for v in verdicts), "")

    # --- recovery ---------------------------------------------------------------

    def recover(
        self, step: PlanStep, tool: ToolSpec, error: str, attempt: int, retryable: bool, run: RunContext
    ) -> RecoveryDecision:
        decision: RecoveryDecision | None = self.hook.agentkeel_recover(
            step=step, tool=tool, error=error, attempt=attempt, retryable=retryable, run=run
        )
        return decision or RecoveryDecision("fail", "no recovery plugin answered")

    # --- observers --------------------------------------------------------------

    def event(self, kind: str, run_id: str, **data: Any) -> None:
        if self.has_observers:
            self.hook.agentkeel_event(event=Event(kind=kind, run_id=run_id, data=data))

    # --- inspection -------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Each plugin with its distribution version and the hooks it implements."""
        dists = {id(plugin): dist for plugin, dist in self.pm.list_plugin_distinfo()}
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            dist = dists.get(id(plugin))
            out.append(
                {
                    "name": name,
                    "module": getattr(plugin, "__name__", type(plugin).__name__),
                    "distribution": dist.project_name if dist else ("agentkeel" if name in _DEFAULT_NAMES else None),
                    "version": dist.version if dist else (_own_version() if name in _DEFAULT_NAMES else None),
                    "default": name in _DEFAULT_NAMES,
                    "hooks": hooks,
                }
            )
        return out


_PASS = Verdict(True, 1.0, "")
_DEFAULT_NAMES = frozenset(short_name(m) for m in DEFAULT_PLUGINS)


def _own_version() -> str:
    try:
        return importlib.metadata.version(PROJECT_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
