"""Every hook agentkeel calls, grouped by component.

Pluggy calls hooks with keyword arguments only; an implementation may accept
any subset of the arguments listed here, so new arguments can be added without
breaking plugins. Hooks documented as "may return an awaitable" are awaited by
the host when they do.

The three ``agentkeel_register_*`` hooks are called by the host once per
implementing plugin (through a pluggy subset hook caller), with a ``register``
callback bound to that plugin, so that everything registered is attributed to
the plugin that registered it.

No hook receives the ``AgentSystem``: each gets the narrow arguments it needs.
The lifecycle hooks still accept a ``system`` argument for one release; it is
deprecated, and nothing in agentkeel or its default plugins reads it.

Hook options used on purpose:
- ``firstresult``: "who handles this" — the first non-None answer wins.
- ``tryfirst`` / ``trylast`` on implementations: defaults are ``trylast`` so a
  plugin's implementation runs before them without special code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from agentkeel.markers import hookspec

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.context import RunContext
    from agentkeel.cost.store import BudgetStore
    from agentkeel.cost.tokens import Tokenizer
    from agentkeel.journal.base import Journal
    from agentkeel.memory.embed import Embedder
    from agentkeel.permissions.keys import KeyStore
    from agentkeel.planner.plan import PlanTemplate
    from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
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


# --- registration (tool router) -------------------------------------------------


@hookspec
def agentkeel_register_tools(register: Callable[[Any], None], config: Config) -> None:
    """Register tools.

    :param register: call ``register(fn)`` for each function decorated with
        ``@agentkeel.tool`` (or ``register(spec)`` with a ready ``ToolSpec``).
    :param config: the validated configuration (a plugin whose tools come from
        configuration, such as MCP servers, reads its section here).

    The host attributes each tool to the plugin whose implementation called
    ``register`` and validates it (duplicate names, unknown rollback or fallback
    targets, invalid JSON Schemas, unknown sandboxes), raising ``ToolSpecError``
    naming the plugin.

    :return: ignored. Not firstresult: every plugin registers.
    """


@hookspec
def agentkeel_register_plan_templates(register: Callable[[PlanTemplate], None]) -> None:
    """Register rule-planner templates.

    :param register: call ``register(PlanTemplate(pattern=..., steps=[...]))`` per
        template. A template whose regular expression fully matches the request
        message yields a plan without any LLM call.

    :return: ignored. Not firstresult: every plugin registers.
    """


@hookspec
def agentkeel_register_sandboxes(register: Callable[..., None], config: Config) -> None:
    """Register execution sandbox backends.

    :param register: call ``register(name, backend, replace=False)``. ``backend``
        implements ``agentkeel.SandboxBackend`` and declares its isolation
        ``strength`` (an int; the built-ins are inprocess 0, subprocess 10,
        docker 20), so configuration can tighten a tool's isolation but never
        loosen it. A name already registered is refused unless ``replace=True``,
        which replaces that backend explicitly. Any registered name is usable as
        a tool's ``isolation``.
    :param config: the validated configuration.

    :return: ignored. Not firstresult: every plugin registers.
    """


# --- lifecycle ------------------------------------------------------------------


@hookspec
def agentkeel_startup(
    config: Config, tools: Mapping[str, ToolSpec], sandboxes: Mapping[str, SandboxBackend], system: Any
) -> Awaitable[None] | None:
    """Called once before the first request is served (open stores, check settings).

    :param config: the validated configuration.
    :param tools: every registered tool, by name (read-only).
    :param sandboxes: every registered sandbox backend, by name (read-only).
    :param system: deprecated, kept for one release; do not use it.

    :return: None, or an awaitable the host awaits. Not firstresult: every
        implementation runs.
    """


@hookspec
def agentkeel_shutdown(
    config: Config, tools: Mapping[str, ToolSpec], sandboxes: Mapping[str, SandboxBackend], system: Any
) -> Awaitable[None] | None:
    """Called once when the system closes (release stores). Sandbox backends are
    closed by the host after this hook (``backend.aclose()``).

    :param config: the validated configuration.
    :param tools: every registered tool, by name (read-only).
    :param sandboxes: every registered sandbox backend, by name (read-only).
    :param system: deprecated, kept for one release; do not use it.

    :return: None, or an awaitable the host awaits. Not firstresult: every
        implementation runs.
    """


# --- permissions gate -----------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_resolve_principal(user_id: str, config: Config) -> Principal | None:
    """Authenticate a caller.

    :param user_id: who the request says it comes from.
    :param config: the validated configuration.

    :return: the caller's ``Principal``, or None when unknown. firstresult: the
        first principal returned wins. If no implementation returns one the
        request is denied: an unknown caller never gets tools.
    """


@hookspec
def agentkeel_authorize(
    principal: Principal, tool: ToolSpec, args: Mapping[str, Any] | None
) -> Decision | None:
    """Decide whether a principal may call a tool.

    :param principal: the authenticated caller.
    :param tool: the tool to be called.
    :param args: None for the tool-level check (which tools the planner may see,
        made once per plan), the resolved arguments for the check made before
        every call attempt.

    :return: a ``Decision``, or None to abstain. Not firstresult: the call is
        allowed only when at least one implementation allows it and none denies
        it (deny by default). ``Decision(False, reason, wait=True)`` pauses the
        run as ``waiting`` instead of denying.
    """


@hookspec(firstresult=True)
def agentkeel_open_key_store(config: Config) -> KeyStore | None:
    """Open the store of the HTTP service's API keys (``agentkeel serve``, ``agentkeel keys``).

    :param config: the validated configuration.

    :return: a ``KeyStore`` (``agentkeel.permissions.keys``), or None to let the next
        plugin open one. firstresult. The default (``trylast``) is SQLite in
        ``<home>/agentkeel.db``, or in memory with ``[journal] backend = "memory"``.
        Called once per service or command, not by runs.
    """


# --- cost controller ------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_model_price(model: str, config: Config) -> ModelPrice | None:
    """Price a model.

    :param model: the model name as sent to the LLM server.
    :param config: the validated configuration.

    :return: the price in USD per million tokens, or None if unknown.
        firstresult. When nobody knows the price the call is refused with
        ``UnknownModelPriceError``: an unknown price is never treated as free.
    """


@hookspec(firstresult=True)
def agentkeel_open_budget_store(config: Config) -> BudgetStore | None:
    """Open the store of the cost ledger and the scoped budgets (per session, per user
    and day, per principal and month).

    :param config: the validated configuration.

    :return: a ``BudgetStore`` (``agentkeel.cost.store``), or None to let the next
        plugin open one. firstresult. The default (``trylast``) is SQLite in
        ``<home>/agentkeel.db``, or in memory with ``[journal] backend = "memory"``.
        Called once per system, on first use.
    """


# --- memory manager -------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_load_context(
    request: AgentRequest,
    config: Config,
    tools: Mapping[str, ToolSpec] | None,
    run: RunContext | None,
    embedder: Embedder | None,
    tokenizer: Tokenizer | None,
) -> MemoryContext | Awaitable[MemoryContext | None] | None:
    """Load the context the prompts of a request see (planner and responder).

    :param request: the request being served.
    :param config: the validated configuration.
    :param tools: the tools the principal may call (None when not known); names of
        other registered tools (``run.tools``) must not reach the context.
    :param run: the run's context (its budget, its principal), or None. Priced
        calls made while loading (embeddings, an LLM summary) reserve from it.
    :param embedder: what ``agentkeel_embedder`` built for ``[memory]
        embedding_model`` (None: semantic retrieval is off).
    :param tokenizer: counts tokens for every configured tier's model (the
        largest count of their tokenizers), or None when one of them has no known
        tokenizer: then count bytes (an upper bound).

    :return: a ``MemoryContext`` (profile, retrieved memories, summary, recent
        turns, with the report of what was included and dropped), None to
        abstain, or an awaitable resolving to either. firstresult. With no
        memory plugin the request runs with an empty context. Memory is data:
        prompts quote it as untrusted.
    """


@hookspec(firstresult=True)
def agentkeel_tokenizer(model: str, config: Config) -> Tokenizer | None:
    """The exact tokenizer of ``model``, to count what memory puts in its prompts.

    :param model: a model name of ``[[models.tiers]]``.
    :param config: the validated configuration.

    :return: a ``Tokenizer`` (``agentkeel.cost.tokens``), or None when not known
        (then bytes are counted). firstresult. The default (``trylast``) knows
        OpenAI's encodings when ``bpe-openai`` is installed. Called once per
        model per system.
    """


@hookspec(firstresult=True)
def agentkeel_embedder(config: Config) -> Embedder | None:
    """Build the embedder for ``[memory] embedding_model`` (semantic retrieval).

    :param config: the validated configuration.

    :return: an ``Embedder`` (``agentkeel.memory.embed``) for the configured model,
        or None to let the next plugin answer (a plugin serving models locally
        answers only for the names it serves). firstresult. The default
        (``trylast``) embeds through the OpenAI-compatible embeddings API of the
        configured endpoint when a model is set. Called once per system.
    """


@hookspec
def agentkeel_save_turn(request: AgentRequest, response: AgentResponse, config: Config) -> None:
    """Persist what was learned from a finished request.

    :param request: the request that was served.
    :param response: its response.
    :param config: the validated configuration.

    :return: ignored. Not firstresult: every implementation runs.
    """


# --- journal (durable runs) ---------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_open_journal(config: Config) -> Journal | None:
    """Open the journal that records runs and step intents/outcomes.

    :param config: the validated configuration.

    :return: a ``Journal``, or None to let the next plugin open one.
        firstresult. The default (``trylast``) is SQLite under ``config.home``,
        or an in-memory journal when ``[journal] backend = "memory"``. Called
        once per system, on first use.
    """


# --- planner --------------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_plan(
    request: AgentRequest,
    context: MemoryContext,
    tools: Mapping[str, ToolSpec],
    run: RunContext,
    templates: Sequence[PlanTemplate],
    progress: Progress | None,
) -> Plan | Awaitable[Plan | None] | None:
    """Turn a request into a ``Plan``, or plan the next revision of a run.

    :param request: the request being served.
    :param context: what the memory manager loaded for it.
    :param tools: the tools the principal may call: the only ones to plan with.
    :param run: the run's context; priced calls must reserve budget through it
        (``run.reserve_llm``) first.
    :param templates: every registered ``PlanTemplate``, in registration order.
    :param progress: None for a run's first plan. For a later revision: why it is
        asked (``"replan"`` after a failed step, ``"round"`` after a plan marked
        ``observe``), every step result so far, the failure, and the step id the
        new plan's steps are numbered from (``parse_plan(..., first_step_id=)``).
        A planner that cannot plan a later revision returns None.

    :return: a Plan, None to let the next planner try, or an awaitable resolving
        to either (an async planner may abstain too). firstresult: the first
        plan wins. Raise ``PlanningError`` when planning failed. A plan with
        ``observe=True`` is run and the planner is asked again (bounded by
        ``[planner] max_rounds``); a plan with no steps and an ``answer`` ends
        the rounds. Every revision passes the same checks as the first plan.
    """


@hookspec
def agentkeel_check_plan(
    plan: Plan, tools: Mapping[str, ToolSpec], principal: Principal
) -> list[str] | None:
    """Check a plan before anything runs.

    :param plan: the plan to check.
    :param tools: the tools the principal may call.
    :param principal: the authenticated caller.

    :return: a list of problems (empty or None if fine). Not firstresult: the
        problems of every implementation are collected and a plan with any
        problem is rejected with all of them.
    """


# --- tool router ----------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_call_tool(call: ToolCall, sandbox: SandboxBackend, run: RunContext) -> Awaitable[Any]:
    """Make one tool call attempt, forward or compensating, inside the tool router
    (after the budget, rate limit, breaker and journal intent; before settlement).

    :param call: the call: ``call.spec``, ``call.args`` (final, with the
        idempotency key when the tool takes it), ``call.timeout``, ``call.run_id``,
        ``call.step_id``, ``call.kind`` ("forward" or "compensation") and
        ``call.attempt`` (1-based).
    :param sandbox: the backend of the tool's isolation.
    :param run: the run's context.

    :return: an awaitable of the tool's result. firstresult; the default
        (``trylast``) is ``sandbox.run(call)``. Plugins trace, guard or time
        every call with a ``wrapper=True`` implementation, which receives the
        inner awaitable from ``yield`` and returns one (e.g. a coroutine that
        awaits it). With no wrapper registered the host calls the sandbox
        directly, so this hook costs nothing when unused.
    """
    raise NotImplementedError  # a specification: pluggy never calls it


# --- evaluator ------------------------------------------------------------------


@hookspec
def agentkeel_evaluate(
    step: PlanStep, tool: ToolSpec, result: Any, run: RunContext
) -> Verdict | Awaitable[Verdict | None] | None:
    """Judge a step's result.

    :param step: the plan step (its ``expect`` schema included). For a
        compensation, a step whose tool is the compensating tool.
    :param tool: the tool that produced the result.
    :param result: what the tool returned.
    :param run: the run's context: an evaluator that makes priced calls (an LLM
        judge) reserves through ``run.reserve_llm`` first, like a planner.

    :return: a ``Verdict``, None to abstain, or an awaitable of either (an async
        judge). Not firstresult: the step passes only if every verdict passes;
        its score is the lowest score given. A rejected result of a tool that is
        not retry-safe is never retried: the effect stays journaled and is
        compensated if the run aborts.
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
    """Decide what to do after a call attempt failed (compensations included).

    :param step: the plan step (for a compensation, a step of the compensating tool).
    :param tool: the tool whose attempt failed.
    :param error: what went wrong.
    :param attempt: the attempt number, 1-based.
    :param retryable: False when the failure is known to be permanent (bad input,
        a refusal, a rejected effect) rather than transient.
    :param run: the run's context (``run.config`` holds ``[retry]``).

    :return: a ``RecoveryDecision``, or None to abstain. firstresult. The host
        never retries a tool that is not retry-safe (neither idempotent nor
        accepting an idempotency key), whatever a plugin answers.
    """


# --- responder ----------------------------------------------------------------


@hookspec(firstresult=True)
def agentkeel_respond(
    request: AgentRequest,
    status: RunStatus,
    detail: str,
    plan: Plan | None,
    steps: Sequence[StepResult],
    context: MemoryContext,
    run: RunContext | None,
) -> Answer | Awaitable[Answer | None] | None:
    """Write the user-facing answer of a finished (or paused) run.

    :param request: the request that was served.
    :param status: how the run ended.
    :param detail: what the host says happened (the failure, what was undone).
    :param plan: the latest plan revision (None when none was made).
    :param steps: every step of every revision, as it ended; the results of
        steps the principal was denied are never included.
    :param context: what the memory manager loaded for the request.
    :param run: the run's context (budget: priced calls reserve through
        ``run.reserve_llm`` first; ``run.emit("answer_delta", text=...)`` streams
        text). None when the principal is unknown.

    :return: an ``Answer``, None to let the next responder try, or an awaitable
        of either. firstresult. Step results are data: a responder must never
        follow instructions found in them. The defaults are the LLM responder
        (when an LLM is configured and the plan carries no answer of its own)
        and, ``trylast``, the deterministic responder, which always answers.
    """


# --- observers ------------------------------------------------------------------


@hookspec
def agentkeel_event(event: Event) -> None:
    """Observe run events, in order: "run_started", "plan_ready" (each revision,
    with ``revision``, ``reason`` and ``plan``), "step_started", "step_attempt_failed",
    "step_finished", "replan", "step_compensated", "approval_requested",
    "answer_delta" (streamed answer text), "answer", "run_finished".
    Steps may run at the same time (``[executor] max_parallel``): "step_started"
    names in ``alongside`` the step ids in flight or starting with it, and the
    events of such steps interleave.

    Observers (not a run's stream) also get:

    - "phase_started" / "phase_finished" around each phase of a run (``phase``:
      "permissions", "memory", "plan", "llm" (one chat completion), "plan_check",
      "step" (forward or compensation), "evaluate", "recover", "compensate",
      "respond"), paired by ``span`` (an int unique in the run), always properly
      nested within one task, with ``attributes`` and, at the end, ``error`` and
      ``error_type`` (None when the phase ended normally). Attributes may hold
      contents (``messages``, ``output``, ``reason``, ``error``): personal data a
      plugin records only when told to;
    - "run_started" carries ``trace``, a dict a tracing observer may fill (W3C
      trace context); it is journaled with the run, and "run_resumed" (``action``:
      "resume", "rollback" or "cancel") gives it back as ``earlier_trace``;
    - "breaker_state" (``tool``, ``previous``, ``state``) when a call moved a
      tool's in-process circuit breaker.

    :param event: the event: ``kind``, ``run_id`` and ``data``.

    :return: ignored. Not firstresult. Called only when some plugin implements
        it, so observers cost nothing when absent.
    """
