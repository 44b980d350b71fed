"""The typed facade over ``pm.hook``: call sites get checked arguments and return types.

It also holds what the host derives from the registered hooks once per system:
whether anyone observes events or wraps tool calls (so those cost nothing when
nobody does), and the planners in call order.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

from agentkeel.errors import PluginError
from agentkeel.permissions.gate import combine_decisions
from agentkeel.plugin.manager import DEFAULT_NAMES, LoadedPlugins, own_version, plugin_label
from agentkeel.types import (
    AgentRequest,
    AgentResponse,
    Answer,
    Decision,
    Event,
    MemoryContext,
    ModelPrice,
    Plan,
    PlanStep,
    Principal,
    Progress,
    RecoveryDecision,
    RunStatus,
    StepResult,
    ToolSpec,
    Verdict,
)

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.context import RunContext
    from agentkeel.cost.tokens import Tokenizer
    from agentkeel.memory.embed import Embedder
    from agentkeel.permissions.keys import KeyStore
    from agentkeel.planner.plan import PlanTemplate
    from agentkeel.sandbox.protocol import SandboxBackend, ToolCall

REGISTRATION_HOOKS = ("agentkeel_register_tools", "agentkeel_register_plan_templates", "agentkeel_register_sandboxes")


class Plugins:
    """Typed facade over ``pm.hook``."""

    def __init__(self, loaded: LoadedPlugins) -> None:
        self.loaded = loaded
        self.pm = loaded.pm
        self.hook = loaded.pm.hook
        self.has_observers = bool(self.hook.agentkeel_event.get_hookimpls())
        # The per-step hooks are called directly when no wrapper needs pluggy (its dispatch costs
        # more than most implementations do); the plugins are fixed once the system is built.
        self._authorize = _direct(self.hook.agentkeel_authorize)
        self._evaluate = _direct(self.hook.agentkeel_evaluate)
        impls = self.hook.agentkeel_call_tool.get_hookimpls()
        self.wraps_tool_calls = any(i.wrapper or i.hookwrapper for i in impls) or _replaced_default(impls)
        self._callers: dict[str, list[tuple[str, pluggy.HookCaller]]] = {}
        self._embedders: dict[int, tuple[Config, Embedder | None]] = {}
        self._tokenizers: dict[int, tuple[Config, Tokenizer | None]] = {}

    # --- registration -----------------------------------------------------------

    def register_each(self, hook_name: str, bind: Callable[[str], Mapping[str, Any]]) -> list[tuple[str, Exception]]:
        """Call a registration hook once per implementing plugin, in registration order.

        ``bind(plugin_name)`` gives the keyword arguments for that plugin (a
        ``register`` callback attributing what it registers to the plugin). Each
        call goes through a pluggy subset hook caller holding only that plugin.
        Returns the plugins whose implementation raised, with the error.
        """
        caller = getattr(self.hook, hook_name)
        implementing = {id(impl.plugin) for impl in caller.get_hookimpls()}
        everyone = [p for _, p in self.pm.list_name_plugin() if p is not None]
        failures: list[tuple[str, Exception]] = []
        for plugin in everyone:
            if id(plugin) not in implementing:
                continue
            name = plugin_label(self.pm, plugin)
            subset = self.pm.subset_hook_caller(hook_name, remove_plugins=[p for p in everyone if p is not plugin])
            try:
                subset(**bind(name))
            except Exception as exc:  # noqa: BLE001 - reported against the plugin that raised it
                failures.append((name, exc))
        return failures

    # --- lifecycle --------------------------------------------------------------

    def startup(self, **kwargs: Any) -> list[Any]:
        return list(self.hook.agentkeel_startup(**kwargs))

    def shutdown(self, **kwargs: Any) -> list[Any]:
        return list(self.hook.agentkeel_shutdown(**kwargs))

    # --- permissions ------------------------------------------------------------

    def resolve_principal(self, user_id: str, config: Config) -> Principal | None:
        result: Principal | None = self.hook.agentkeel_resolve_principal(user_id=user_id, config=config)
        return result

    def authorize(self, principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None) -> Decision:
        """Combine every decision: allowed only if someone allows and nobody denies."""
        if self._authorize is not None:
            return combine_decisions(self._authorize({"principal": principal, "tool": tool, "args": args}))
        return combine_decisions(self.hook.agentkeel_authorize(principal=principal, tool=tool, args=args))

    def open_key_store(self, config: Config) -> KeyStore:
        """The API key store (``agentkeel_open_key_store``); the caller closes it.
        ``PluginError`` when no plugin opens one."""
        store: KeyStore | None = self.hook.agentkeel_open_key_store(config=config)
        if store is None:
            raise PluginError("keys", "no plugin opened an API key store (agentkeel_open_key_store)")
        return store

    # --- cost -------------------------------------------------------------------

    def model_price(self, model: str, config: Config) -> ModelPrice | None:
        result: ModelPrice | None = self.hook.agentkeel_model_price(model=model, config=config)
        return result

    # --- memory -----------------------------------------------------------------

    async def load_context(
        self, request: AgentRequest, config: Config, tools: Mapping[str, ToolSpec] | None = None,
        run: RunContext | None = None,
    ) -> MemoryContext:
        result = self.hook.agentkeel_load_context(request=request, config=config, tools=tools, run=run,
                                                  embedder=self.embedder(config), tokenizer=self.tokenizer(config))
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, MemoryContext) else MemoryContext()

    def tokenizer(self, config: Config) -> Tokenizer | None:
        """What counts tokens for every tier of ``config`` (the largest of their counts), or
        None when a tier's model has no known tokenizer (built once per config)."""
        cached = self._tokenizers.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        from agentkeel.cost.tokens import MostOf

        found: list[Tokenizer] = []
        for model in dict.fromkeys(t.model for t in config.tiers):
            try:
                tokenizer: Tokenizer | None = self.hook.agentkeel_tokenizer(model=model, config=config)
            except Exception as exc:  # noqa: BLE001 - any plugin's failure: bytes are counted
                logging.getLogger("agentkeel.memory").warning(
                    "memory: no tokenizer for %s (%s: %s); counting bytes", model, type(exc).__name__, exc)
                tokenizer = None
            if tokenizer is None:
                found = []
                break
            found.append(tokenizer)
        combined: Tokenizer | None = MostOf(found) if found else None
        self._tokenizers[id(config)] = (config, combined)
        return combined

    def embedder(self, config: Config) -> Embedder | None:
        """The embedder for ``config`` (built once); a plugin that fails to build one is
        logged and semantic retrieval is off (memory never fails a request)."""
        cached = self._embedders.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        try:
            embedder: Embedder | None = self.hook.agentkeel_embedder(config=config)
        except Exception as exc:  # noqa: BLE001 - any plugin's failure: retrieval goes on lexically
            logging.getLogger("agentkeel.memory").warning(
                "memory: no embedder for memory.embedding_model (%s: %s); retrieval is lexical only",
                type(exc).__name__, exc)
            embedder = None
        self._embedders[id(config)] = (config, embedder)
        return embedder

    def save_turn(self, request: AgentRequest, response: AgentResponse, config: Config) -> None:
        self.hook.agentkeel_save_turn(request=request, response=response, config=config)

    # --- planner ----------------------------------------------------------------

    async def plan(
        self,
        request: AgentRequest,
        context: MemoryContext,
        tools: Mapping[str, ToolSpec],
        run: RunContext,
        templates: Sequence[PlanTemplate],
        progress: Progress | None = None,
    ) -> Plan | None:
        """Ask each planner in turn until one returns a plan (``progress``: a later revision)."""
        planned = await self._first_result(
            "agentkeel_plan", Plan, request=request, context=context, tools=tools, run=run, templates=templates,
            progress=progress)
        return planned if isinstance(planned, Plan) else None

    async def respond(
        self,
        request: AgentRequest,
        status: RunStatus,
        detail: str,
        plan: Plan | None,
        steps: Sequence[StepResult],
        context: MemoryContext,
        run: RunContext | None,
    ) -> Answer | None:
        """Ask each responder in turn until one answers."""
        answer = await self._first_result(
            "agentkeel_respond", Answer, request=request, status=status, detail=detail, plan=plan, steps=steps,
            context=context, run=run)
        return answer if isinstance(answer, Answer) else None

    async def _first_result(self, hook_name: str, kind: type, **kwargs: Any) -> Any:
        """The first non-None result of a firstresult hook whose implementations may be async.

        pluggy's firstresult stops at the first non-None value, and a coroutine is
        never None, even when it resolves to None; so each implementation is called
        through its own subset hook caller (wrappers included) and awaited before
        the next one is asked.
        """
        for name, caller in self._callers_of(hook_name):
            result = caller(**kwargs)
            if inspect.isawaitable(result):
                result = await result
            if result is None:
                continue
            if not isinstance(result, kind):
                raise PluginError(name, f"{hook_name} returned {type(result).__name__}, not a {kind.__name__} or None")
            return result
        return None

    def _callers_of(self, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
        callers = self._callers.get(hook_name)
        if callers is None:
            impls = [i for i in getattr(self.hook, hook_name).get_hookimpls() if not (i.wrapper or i.hookwrapper)]
            plugins = [impl.plugin for impl in reversed(impls)]  # pluggy's call order
            callers = [
                (plugin_label(self.pm, p), self.pm.subset_hook_caller(
                    hook_name, remove_plugins=[q for q in plugins if q is not p]))
                for p in plugins
            ]
            self._callers[hook_name] = callers
        return callers

    def check_plan(self, plan: Plan, tools: Mapping[str, ToolSpec], principal: Principal) -> list[str]:
        problems: list[str] = []
        for found in self.hook.agentkeel_check_plan(plan=plan, tools=tools, principal=principal):
            problems.extend(found)
        return problems

    # --- tool router ------------------------------------------------------------

    def call_tool(self, call: ToolCall, sandbox: SandboxBackend, run: RunContext) -> Awaitable[Any]:
        result: Awaitable[Any] = self.hook.agentkeel_call_tool(call=call, sandbox=sandbox, run=run)
        return result

    # --- evaluator --------------------------------------------------------------

    def evaluate(
        self, step: PlanStep, tool: ToolSpec, result: Any, run: RunContext
    ) -> Verdict | Awaitable[Verdict]:
        """The combined verdict; an awaitable of it when some evaluator answered with one."""
        if self._evaluate is not None:
            verdicts: list[Any] = self._evaluate({"step": step, "tool": tool, "result": result, "run": run})
        else:
            verdicts = self.hook.agentkeel_evaluate(step=step, tool=tool, result=result, run=run)
        for verdict in verdicts:
            if not isinstance(verdict, Verdict):
                return _awaited(verdicts)
        return _combine(verdicts)

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
        """Each plugin with its distribution version and the hooks it implements,
        then each plugin that could not be loaded (``broken``, with its error)."""
        out: list[dict[str, Any]] = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            if plugin is None:
                continue
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            default = name in DEFAULT_NAMES
            dist, version = self.loaded.distributions.get(name, (None, None))
            out.append({
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "distribution": "agentkeel" if default else dist,
                "version": own_version() if default else version,
                "default": default,
                "hooks": hooks,
                "error": None,
            })
        for broken in self.loaded.broken:
            out.append({"name": broken.name, "module": None, "distribution": None, "version": None,
                        "default": broken.name in DEFAULT_NAMES, "hooks": [], "error": broken.error})
        return out


def _combine(verdicts: Sequence[Verdict]) -> Verdict:
    """Every verdict must pass; the score is the lowest given (no verdict: a pass)."""
    if not verdicts:
        return _PASS
    failed = [v for v in verdicts if not v.passed]
    if failed:
        return Verdict(False, min(v.score for v in verdicts), "; ".join(v.reason for v in failed))
    if len(verdicts) == 1:
        return verdicts[0]
    return Verdict(True, min(v.score for v in verdicts), "")


async def _awaited(results: Sequence[Any]) -> Verdict:
    """Await the async verdicts (in order), drop abstentions, combine."""
    verdicts: list[Verdict] = []
    for result in results:
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            continue
        if not isinstance(result, Verdict):
            raise PluginError("evaluator", f"agentkeel_evaluate returned {type(result).__name__}, not a Verdict")
        verdicts.append(result)
    return _combine(verdicts)


def _replaced_default(impls: Sequence[Any]) -> bool:
    """True when ``agentkeel_call_tool`` has an implementation besides the default one
    (``sandbox.run(call)``), so the hook must be dispatched rather than skipped."""
    from agentkeel.tools.router import agentkeel_call_tool as default

    return any(i.function is not default for i in impls)


_PASS = Verdict(True, 1.0, "")


def _direct(caller: pluggy.HookCaller) -> Callable[[Mapping[str, Any]], list[Any]] | None:
    """The hook's implementations called one after the other, as pluggy orders them, their
    non-None results collected (pluggy's own semantics for a hook without ``firstresult``), or
    None when a wrapper needs pluggy's machinery."""
    impls = caller.get_hookimpls()
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        return None
    calls = [(impl.function, impl.argnames) for impl in reversed(impls)]
    if len(calls) == 1:
        function, names = calls[0]

        def one(arguments: Mapping[str, Any]) -> list[Any]:
            result = function(*[arguments[name] for name in names])
            return [] if result is None else [result]

        return one

    def each(arguments: Mapping[str, Any]) -> list[Any]:
        results = []
        for function, names in calls:
            result = function(*[arguments[name] for name in names])
            if result is not None:
                results.append(result)
        return results

    return each
