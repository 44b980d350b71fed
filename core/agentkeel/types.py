"""The attrs classes that cross component boundaries.

Everything a hook receives or returns is one of these; they are frozen so a
plugin cannot change what another plugin, or the journal, has already seen.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs


class StepStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    DENIED = "denied"
    WAITING = "waiting"
    IN_DOUBT = "in_doubt"
    COMPENSATED = "compensated"


class RunStatus(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DENIED = "denied"
    BUDGET_EXHAUSTED = "budget_exhausted"
    REJECTED = "rejected"
    IN_DOUBT = "in_doubt"
    WAITING = "waiting"
    DEGRADED = "degraded"
    """Answered without an optional step whose tool was unavailable (the answer says what is missing)."""
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    CANCELLED = "cancelled"
    """Stopped on request at a step boundary; the steps that took effect were compensated."""


def _new_run_id() -> str:
    return uuid.uuid4().hex[:16]


def check_text(what: str, value: object, *, allow_empty: bool = False) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``value`` is text that UTF-8 can carry.

    Lone surrogates (what Python makes of undecodable bytes in argv) cannot be
    stored or sent anywhere, so they are refused here rather than deep inside a store.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{what} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text") from None


def check_budget(value: float | None) -> None:
    """Raise ``ValueError`` unless ``value`` is None or a finite amount >= 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"budget must be a number of USD, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"budget must be a finite amount of USD >= 0, got {value!r}")


def _text(what: str, *, allow_empty: bool = False) -> Callable[[Any, Any, Any], None]:
    def validate(_instance: Any, _attribute: Any, value: Any) -> None:
        check_text(what, value, allow_empty=allow_empty)

    return validate


@attrs.frozen
class AgentRequest:
    """One user message to serve. ``budget_usd=None`` takes the configured default.

    Invalid fields raise ``ValueError`` naming the field: an empty message or
    user id, text that is not valid UTF-8, a budget that is negative, NaN or infinite.
    """

    message: str = attrs.field(validator=_text("message"))
    user_id: str = attrs.field(validator=_text("user id"))
    session_id: str = attrs.field(default="default", validator=_text("session id"))
    budget_usd: float | None = attrs.field(default=None, validator=lambda _i, _a, v: check_budget(v))
    run_id: str = attrs.field(factory=_new_run_id, validator=_text("run id"))


@attrs.frozen
class Principal:
    """An authenticated caller: who they are and what they hold.

    `tools`, when not None, is an explicit allow-list on top of permissions;
    `constraints` maps a tool name to a JSON Schema its arguments must also meet;
    `approvals` maps a tool name to the JSON Schema of the arguments whose calls
    need a human's approval first (None: every call of it).
    """

    name: str
    permissions: frozenset[str] = frozenset()
    tools: frozenset[str] | None = None
    constraints: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    approvals: Mapping[str, Mapping[str, Any] | None] = attrs.field(factory=dict)


@attrs.frozen
class ToolSpec:
    """What the runtime must know about a tool. Built by `@tool`, checked by the host."""

    name: str
    description: str
    fn: Callable[..., Any] = attrs.field(eq=False, repr=False)
    args_schema: Mapping[str, Any] = attrs.field(repr=False)
    output_schema: Mapping[str, Any] | None = attrs.field(default=None, repr=False)
    permissions: frozenset[str] = frozenset()
    idempotent: bool = False
    rollback: str | None = None
    fallback: str | None = None
    isolation: str = attrs.field(default="inprocess", validator=attrs.validators.min_len(1))
    timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    rate_limit: float | None = None
    cost_usd: float = 0.0
    accepts_key: bool = False
    accepts_run: bool = False
    """The tool takes a ``run`` parameter: the runtime passes the call's ``RunContext``."""
    is_async: bool = False
    plugin: str = ""
    image: str | None = None
    allow_uncancellable: bool = False
    requires_approval: bool = False
    """Every call waits for a human's approval (``agentkeel approve``) before it runs."""
    max_concurrency: int | None = None
    """The most calls of this tool in flight at once in one process (all runs together); None: no limit."""
    source: str = ""
    """Where the tool comes from when it is not a Python function of its plugin (e.g. an MCP
    server: ``"mcp stdio server 'files': python server.py"``); shown by ``agentkeel tools``. Such a
    tool runs in the isolation it declares: config cannot move it to another sandbox."""
    derived: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)
    """For metadata the tool did not declare itself: each field (``idempotent``, ``permissions``,
    ``timeout``, ...) with where its value came from (``"readOnlyHint"``, ``"config"``, ``"default"``)."""

    @property
    def retry_safe(self) -> bool:
        """True when running the tool twice for one step cannot duplicate an effect."""
        return self.idempotent or self.accepts_key

    @property
    def qualified_name(self) -> str:
        """`module:qualname` of the implementation, used by out-of-process sandboxes."""
        return f"{self.fn.__module__}:{self.fn.__qualname__}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "description": self.description,
            "permissions": sorted(self.permissions),
            "idempotent": self.idempotent,
            "accepts_idempotency_key": self.accepts_key,
            "rollback": self.rollback,
            "fallback": self.fallback,
            "isolation": self.isolation,
            "timeout": self.timeout,
            "rate_limit": self.rate_limit,
            "cost_usd": self.cost_usd,
            "allow_uncancellable": self.allow_uncancellable,
            "requires_approval": self.requires_approval,
            "max_concurrency": self.max_concurrency,
            "source": self.source,
            "metadata_from": dict(self.derived),
            "args_schema": dict(self.args_schema),
            "output_schema": dict(self.output_schema) if self.output_schema else None,
        }


@attrs.frozen
class PlanStep:
    """One tool call in a plan.

    `when` is a declarative condition on earlier results (see `agentkeel.planner.plan`),
    `expect` a JSON Schema the result must satisfy, `depends_on` the earlier
    steps whose results this step reads (through `when` or `{"$ref": ...}` args),
    `arg_refs` those its arguments read (arguments without them are final as planned),
    and the steps it waits for without reading them (`after`). Steps that do not depend
    on each other may run at the same time (``[executor] max_parallel``).
    An `optional` step whose tool is unavailable (it failed without taking effect)
    does not abort the run: the run goes on without it and ends ``degraded``.
    Step ids are unique within a run: the steps of a later plan revision (a
    replan or a next round) are numbered after every step planned before them.
    """

    step_id: int
    tool_name: str
    tool_args: Mapping[str, Any] = attrs.field(factory=dict)
    description: str = ""
    when: Mapping[str, Any] | None = None
    expect: Mapping[str, Any] | None = None
    depends_on: frozenset[int] = frozenset()
    arg_refs: frozenset[int] = frozenset()
    optional: bool = False
    after: frozenset[int] = frozenset()
    """Steps the plan says this one must wait for (its ``"depends_on"``), though it reads none of
    their results; part of ``depends_on``."""


AnswerTemplate = str | tuple[Mapping[str, Any], ...]
"""A rule template's answer: text with ``{N.field}`` placeholders, or a sequence of
``{"when": condition, "text": ...}`` choices (the first whose condition holds)."""


@attrs.frozen
class Plan:
    """A plan (one revision of a run's plan).

    ``observe=True`` marks a round: once its steps have run, the planner is called
    again with their results (adaptive rounds, bounded by ``[planner] max_rounds``).
    ``answer`` is a planner's final answer (a plan with no steps that ends the
    rounds); ``answer_template`` is a rule template's answer, rendered from the
    step results by the deterministic responder.
    """

    steps: tuple[PlanStep, ...]
    reasoning: str = ""
    planner: str = ""
    observe: bool = False
    answer: str | None = None
    answer_template: AnswerTemplate | None = None

    @property
    def first_step_id(self) -> int:
        return self.steps[0].step_id if self.steps else 1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reasoning": self.reasoning,
            "planner": self.planner,
            "steps": [
                {
                    "step_id": s.step_id,
                    "description": s.description,
                    "tool_name": s.tool_name,
                    "tool_args": dict(s.tool_args),
                    **({"when": s.when} if s.when is not None else {}),
                    **({"expect": s.expect} if s.expect is not None else {}),
                    **({"optional": True} if s.optional else {}),
                    **({"depends_on": sorted(s.after)} if s.after else {}),
                }
                for s in self.steps
            ],
        }
        if self.observe:
            out["observe"] = True
        if self.answer is not None:
            out["final"] = True
            out["answer"] = self.answer
        if self.answer_template is not None:
            out["answer_template"] = (self.answer_template if isinstance(self.answer_template, str)
                                      else [dict(c) for c in self.answer_template])
        return out


@attrs.frozen
class PlanRevision:
    """One revision of a run's plan: 1 is the first plan, then one per replan or round.

    ``reason`` is ``"initial"``, ``"replan"`` (after a failed step) or ``"round"``
    (the next round of an adaptive plan).
    """

    number: int
    reason: str
    plan: Plan
    planning_cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.number, "reason": self.reason, "planning_cost_usd": self.planning_cost_usd,
                "plan": self.plan.to_dict()}


@attrs.frozen
class Decision:
    """A permission decision from one `agentkeel_authorize` implementation.

    ``wait=True`` (with ``allowed=False``) pauses the run in the ``waiting`` state
    instead of denying: an approval is pending, and ``resume`` asks again.
    """

    allowed: bool
    reason: str = ""
    wait: bool = False


@attrs.frozen
class ModelPrice:
    """USD per million tokens. ``cached_input_per_mtok``: the price of input tokens the
    server read from its prompt cache (None: the same as any input token). Reasoning
    tokens are output tokens: they are in ``output_tokens`` and priced as output."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    def cost(self, usage: Usage) -> float:
        cached = min(max(usage.cached_tokens, 0), usage.input_tokens)
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        return ((usage.input_tokens - cached) * self.input_per_mtok + cached * cached_price
                + usage.output_tokens * self.output_per_mtok) / 1e6


@attrs.frozen
class Verdict:
    passed: bool
    score: float = 1.0
    reason: str = ""


@attrs.frozen
class RecoveryDecision:
    """What to do after a failed attempt: "retry" (after `delay_s`), "fallback" to
    `fallback_tool`, "fail" the step, or "replan": fail the step and ask the planner
    for a different approach (bounded by ``[recovery] max_replans``; the new plan is
    checked like the first before anything of it runs; otherwise the step fails)."""

    action: str = attrs.field(validator=attrs.validators.in_(("retry", "fallback", "fail", "replan")))
    reason: str = ""
    delay_s: float = 0.0
    fallback_tool: str | None = None


@attrs.frozen
class StepResult:
    step_id: int
    tool_name: str
    status: StepStatus
    tool_args: Mapping[str, Any] = attrs.field(factory=dict)
    result: Any = None
    error: str | None = None
    duration_s: float = 0.0
    cost_usd: float = 0.0
    attempts: int = 0
    verdict: Verdict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "tool_name": self.tool_name,
            "tool_args": dict(self.tool_args),
            "status": self.status.value,
            "result": self.result,
            "error": self.error,
            "duration_s": round(self.duration_s, 6),
            "cost_usd": self.cost_usd,
            "attempts": self.attempts,
            "verdict": attrs.asdict(self.verdict) if self.verdict else None,
        }


@attrs.frozen
class Usage:
    """Tokens of one call; ``cached_tokens`` (of the input) and ``reasoning_tokens``
    (of the output) where the server reports them."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@attrs.frozen
class CostRecord:
    """One priced event: an LLM call (`kind="llm"`, with `tier` and `model`) or a tool call.
    ``purpose``: what it was for ("plan", "respond", "judge", "tool"); ``reason``: why
    it was made ("first_tier", "escalation", "repair", "replan", "round", "answer", "tool")."""

    kind: str
    cost_usd: float
    model: str | None = None
    tier: str | None = None
    tool: str | None = None
    step_id: int | None = None
    usage: Usage | None = None
    estimated: bool = False
    purpose: str = ""
    reason: str = ""


@attrs.frozen
class AuditRecord:
    ts: float
    run_id: str
    principal: str
    action: str
    tool: str
    decision: str
    reason: str
    arg_keys: tuple[str, ...] = ()


@attrs.frozen
class Event:
    """Something observers may want to know about (`agentkeel_event`)."""

    kind: str
    run_id: str
    data: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen
class ContextItem:
    """One piece of memory considered for a prompt: ``kind`` "profile", "memory" (a record
    retrieved from any session of the user), "summary" or "turn"; ``ref`` names the row
    ("turn:42", "memory:7", "profile:name", "summary:s1"); ``tokens`` is what it costs in
    the prompt; ``reason`` says why it was left out, when it was."""

    kind: str
    ref: str
    tokens: int
    reason: str = ""
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "ref": self.ref, "tokens": self.tokens}
        if self.reason:
            out["reason"] = self.reason
        if self.score is not None:
            out["score"] = float(f"{self.score:.4g}")
        return out


@attrs.frozen
class ContextReport:
    """What the memory manager put in the prompt, what it left out and why.

    ``budget_tokens`` is ``[memory] context_tokens``; ``used_tokens`` (never more)
    is counted by ``counter``: the tokenizer of the tiers' models (e.g.
    "o200k_base"; "max(a, b)" for several), or "bytes" (one token per byte, an
    upper bound for every byte-level BPE tokenizer) when one is not known. ``summarised`` are the turns folded into the
    session's summary by this request.
    """

    budget_tokens: int
    used_tokens: int
    counter: str = "bytes"
    included: tuple[ContextItem, ...] = ()
    dropped: tuple[ContextItem, ...] = ()
    summarised: tuple[ContextItem, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_tokens": self.budget_tokens,
            "used_tokens": self.used_tokens,
            "counter": self.counter,
            "included": [i.to_dict() for i in self.included],
            "dropped": [i.to_dict() for i in self.dropped],
            "summarised": [i.to_dict() for i in self.summarised],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ContextReport:
        """The report ``to_dict`` wrote (as the journal keeps it)."""
        def items(key: str) -> tuple[ContextItem, ...]:
            return tuple(ContextItem(str(i["kind"]), str(i["ref"]), int(i["tokens"]), str(i.get("reason", "")),
                                     i.get("score")) for i in data.get(key, ()))

        return cls(int(data["budget_tokens"]), int(data["used_tokens"]), str(data.get("counter", "bytes")),
                   items("included"), items("dropped"), items("summarised"),
                   tuple(str(w) for w in data.get("warnings", ())))


@attrs.frozen
class MemoryContext:
    """What the memory manager loaded for the prompts of a request; empty when no memory
    plugin runs. Every field is data about the user, never instructions: prompts quote it
    (``agentkeel.models.data.quote_memory``).

    ``turns``: recent messages of the session, oldest first (``{"role", "content",
    "run_id"}``); ``summary``: the session's older turns, summarised; ``memories``:
    records retrieved from the user's other turns; ``profile``: (key, value) facts;
    ``facts``: free-form facts a plugin adds; ``report``: what was included and dropped.
    """

    turns: tuple[Mapping[str, Any], ...] = ()
    facts: tuple[str, ...] = ()
    profile: tuple[tuple[str, str], ...] = ()
    summary: str = ""
    memories: tuple[str, ...] = ()
    report: ContextReport | None = None

    @property
    def empty(self) -> bool:
        return not (self.turns or self.facts or self.profile or self.summary or self.memories)

    def lines(self) -> list[dict[str, Any]]:
        """The context as data lines, in prompt order: profile, memories, summary, turns, facts."""
        out: list[dict[str, Any]] = []
        if self.profile:
            out.append({"profile": dict(self.profile)})
        out += [{"memory": m} for m in self.memories]
        if self.summary:
            out.append({"summary": self.summary})
        out += [{"role": str(t.get("role", "user")), "content": str(t.get("content", ""))} for t in self.turns]
        out += [{"fact": f} for f in self.facts]
        return out

    def render(self) -> str:
        """Plain lines, for humans; prompts use ``quote_memory``, which quotes them as data."""
        lines = [f"{t.get('role', 'user')}: {t.get('content', '')}" for t in self.turns]
        lines += [f"fact: {f}" for f in self.facts]
        return "\n".join(lines)


@attrs.frozen
class Progress:
    """What a planner asked for a later revision is told (``progress`` of ``agentkeel_plan``).

    ``reason`` is ``"replan"`` (``failure`` says what failed) or ``"round"``;
    ``steps`` are the results of every step so far, of every revision; the new
    plan's steps must be numbered from ``next_step_id`` and may refer to the
    results of earlier steps that succeeded by their ids.
    """

    reason: str
    revision: int
    plans: tuple[Plan, ...]
    steps: tuple[StepResult, ...]
    next_step_id: int
    failure: str | None = None

    @property
    def results(self) -> dict[int, Any]:
        return {s.step_id: s.result for s in self.steps if s.status is StepStatus.SUCCEEDED}


@attrs.frozen
class Answer:
    """What a responder returns: the text, and who wrote it (``"llm:fast"``, ``"template"``...)."""

    text: str
    source: str = ""


@attrs.frozen
class AgentResponse:
    run_id: str
    status: RunStatus
    message: str
    plan: Plan | None
    steps: tuple[StepResult, ...] = ()
    costs: tuple[CostRecord, ...] = ()
    total_cost_usd: float = 0.0
    duration_s: float = 0.0
    config_error: bool = False
    """True when the run failed because of the configuration (exit code 2 in the CLI)."""
    answer: str = ""
    """The user-facing answer the responder wrote (``message`` is the status detail)."""
    answer_source: str = ""
    revisions: tuple[PlanRevision, ...] = ()
    """Every revision of the run's plan, oldest first (``plan`` is the latest)."""
    context: ContextReport | None = None
    """What memory put in the prompts of the run and what it left out (None: no memory ran)."""

    @property
    def ok(self) -> bool:
        return self.status is RunStatus.SUCCEEDED

    def cost_breakdown(self) -> dict[str, dict[str, float]]:
        """Spending by model tier and by tool (chapter exercise 22.6.2)."""
        by_tier: dict[str, float] = {}
        by_tool: dict[str, float] = {}
        for c in self.costs:
            if c.kind == "llm":
                key = c.tier or c.model or "unknown"
                by_tier[key] = by_tier.get(key, 0.0) + c.cost_usd
            elif c.tool:
                by_tool[c.tool] = by_tool.get(c.tool, 0.0) + c.cost_usd
        return {"by_tier": by_tier, "by_tool": by_tool}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status.value,
            "answer": self.answer,
            "answer_source": self.answer_source,
            "message": self.message,
            "plan": self.plan.to_dict() if self.plan else None,
            "revisions": [r.to_dict() for r in self.revisions],
            "steps": [s.to_dict() for s in self.steps],
            "total_cost_usd": self.total_cost_usd,
            "cost_breakdown": self.cost_breakdown(),
            "duration_s": round(self.duration_s, 6),
            "context": self.context.to_dict() if self.context is not None else None,
        }
