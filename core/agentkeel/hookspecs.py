"""Every hook agentkeel calls, grouped by component.

Pluggy calls hooks with keyword arguments only; an implementation may accept
any subset of the arguments listed here, so new arguments can be added without
breaking plugins. Hooks documented as "may return an awaitable" are awaited by
the host when they do.

The three ``agentkeel_register_*`` hooks are called by the host once per
implementation, with a ``register`` callback bound to that plugin, so that
everything registered is attributed to the plugin that registered it; hook
wrappers do not wrap them.

Hook options used on purpose:
- ``firstresult``: "who handles this" — the first non-None answer wins.
- ``tryfirst`` / ``trylast`` on implementations: defaults are ``trylast`` so a
  plugin's implementation runs before them without special code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from agentkeel.markers import hookspec

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.context import RunContext
    from agentkeel.journal import Journal
    from agentkeel.plan import PlanTemplate
    from agentkeel.sandbox import SandboxBackend
    from agentkeel.system import AgentSystem
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


# --- registration (tool router) -------------------------------------------------


@hookspec
def agentkeel_register_tools(register: Callable[[Any], None]) -> None:
    """Register tools: call ``register(fn)`` for each function decorated with
    ``@agentkeel.tool`` (or ``register(spec)`` with a ready ``ToolSpec``).

    The host attributes each tool to the plugin whose implementation called
    ``register`` and validates it (duplicate names, unknown rollback or fallback
    targets, invalid JSON Schemas), raising ``ToolSpecError`` naming the plugin.
    Return value: ignored. Not firstresult: every plugin registers.
    """


@hookspec
def agentkeel_register_plan_templates(register: Callable[[PlanTemplate], None]) -> None:
    """Register rule-planner templates: ``register(PlanTemplate(pattern, steps))``.

    A template whose regular expression fully matches the request message yields
    a plan without any LLM call. Return value: ignored. Not firstresult.
    """


@hookspec
def agentkeel_register_sandboxes(register: Callable[[str, SandboxBackend], None], config: Config) -> None:
    """Register execution sandbox backends: ``register(isolation_name, backend)``.

    ``backend`` implements ``agentkeel.sandbox.SandboxBackend``. Names must be
    unique; the built-in ones are "inprocess", "subprocess" and "docker".
    Return value: ignored. Not firstresult.
    """


# --- lifecycle ------------------------------------------------------------------


@hookspec
def agentkeel_startup(system: AgentSystem) -> Awaitable[None] | None:
    """Called once before the first request is served (open stores, warm pools).

    May return an awaitable. Not firstresult: every implementation runs.
    """


@hookspec
def agentkeel_shutdown(system: AgentSystem) -> Awaitable[None] | None:
    """Called once when the system closes (release stores, stop containers).

    May return an awaitable. Not firstresult: every implementation runs.
    """


# --- permissions gate -----------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_resolve_principal(user_id: str, config: Config) -> Principal | None:
    """Authenticate ``user_id`` and return its ``Principal``, or None when unknown.

    firstresult. If no implementation returns a principal the request is denied:
    an unknown caller never gets tools.
    """


@hookspec
def agentkeel_authorize(
    principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None
) -> Decision | None:
    """Decide whether ``principal`` may call ``tool``.

    ``args`` is None for the tool-level check (which tools the planner may see)
    and the resolved arguments for the per-step check. Return a ``Decision`` or
    None to abstain. Not firstresult: the call is allowed only when at least one
    implementation allows it and none denies it (deny by default).
    """


# --- cost controller ------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_model_price(model: str, config: Config) -> ModelPrice | None:
    """Return the price of ``model`` in USD per million tokens, or None if unknown.

    firstresult. When nobody knows the price the call is refused with
    ``UnknownModelPriceError``: an unknown price is never treated as free.
    """


# --- memory manager -------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_load_context(request: AgentRequest, config: Config) -> MemoryContext | None:
    """Load the context the planner sees for ``request`` (recent turns, facts).

    firstresult. With no memory plugin the request runs with an empty context.
    """


@hookspec
def agentkeel_save_turn(request: AgentRequest, response: AgentResponse, config: Config) -> None:
    """Persist what was learned from a finished request. Not firstresult."""


# --- journal (durable runs) ---------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_open_journal(config: Config) -> Journal | None:
    """Open the journal that records runs and step intents/outcomes.

    firstresult. The default (``trylast``) is SQLite under ``config.home``, or an
    in-memory journal when ``[journal] backend = "memory"``. Called once per system.
    """


# --- planner --------------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_plan(
    request: AgentRequest,
    context: MemoryContext,
    tools: Mapping[str, ToolSpec],
    run: RunContext,
) -> Plan | Awaitable[Plan] | None:
    """Turn ``request`` into a ``Plan`` using only ``tools`` (those the principal may call).

    firstresult; may return an awaitable, which must resolve to a Plan or raise
    ``PlanningError``. Return None to let the next planner try. Priced calls
    must reserve budget through ``run`` first.
    """


@hookspec
def agentkeel_check_plan(
    plan: Plan, tools: Mapping[str, ToolSpec], principal: Principal
) -> list[str] | None:
    """Check a plan before anything runs; return a list of problems (empty if fine).

    Not firstresult: the problems of every implementation are collected and a
    plan with any problem is rejected with all of them.
    """


# --- evaluator ------------------------------------------------------------------


@hookspec
def agentkeel_evaluate(step: PlanStep, tool: ToolSpec, result: Any) -> Verdict | None:
    """Judge a step's result. Return a ``Verdict`` or None to abstain.

    Not firstresult: the step passes only if every verdict passes; its score is
    the lowest score given.
    """


# --- recovery handler -----------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_recover(
    step: PlanStep,
    tool: ToolSpec,
    error: str,
    attempt: int,
    retryable: bool,
    run: RunContext,
) -> RecoveryDecision | None:
    """Decide what to do after attempt number ``attempt`` (1-based) of ``step`` failed
    with ``error``; ``retryable`` is False when the failure is known to be permanent
    (bad input, a refusal) rather than transient.

    firstresult. The host never retries a tool that is not retry-safe (neither
    idempotent nor accepting an idempotency key), whatever a plugin answers.
    """


# --- observers ------------------------------------------------------------------


@hookspec
def agentkeel_event(event: Event) -> None:
    """Observe run events ("run_started", "step_finished", "run_finished", ...).

    Not firstresult; return value ignored. Called only when some plugin
    implements it, so observers cost nothing when absent.
    """
