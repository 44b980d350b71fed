"""The per-run context handed to planners, recovery hooks and tool-call wrappers.

A leaf: it holds what one run needs (the request, the principal, the budget it
spends from, the registered tools) and never the ``AgentSystem``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from agentkeel.types import AgentRequest, ContextReport, CostRecord, Event, Principal, ToolSpec, Usage

if TYPE_CHECKING:
    from agentkeel.config import Config
    from agentkeel.cost.budget import Budget, Pricer, Reservation


class Span:
    """A phase of a run as observers see it (``RunContext.span``): ``phase_started`` when it
    begins, ``phase_finished`` (with what ``set`` recorded and the error, if any) when it ends.

    The events go to observer plugins only (not to a run's stream): a tracing plugin turns
    them into spans. The attributes are agentkeel's own names (``step_id``, ``tool``,
    ``model``, ``input_tokens``, ...); a plugin maps them to its conventions. They may hold
    contents (``messages``, ``args``, ``result``): a plugin records those only when told to.
    """

    __slots__ = ("_emit", "_run_id", "attributes", "phase", "span_id")

    def __init__(self, emit: Callable[..., None], run_id: str, phase: str, span_id: int,
                 attributes: dict[str, Any]) -> None:
        self._emit = emit
        self._run_id = run_id
        self.phase = phase
        self.span_id = span_id
        self.attributes = attributes

    def set(self, **attributes: Any) -> None:
        """Record attributes known only as the phase goes on (a status, a count, a verdict)."""
        self.attributes.update(attributes)

    def __enter__(self) -> Span:
        self._emit("phase_started", self._run_id, phase=self.phase, span=self.span_id,
                   attributes=dict(self.attributes))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        error = None if exc is None else (str(exc) or type(exc).__name__)
        self._emit("phase_finished", self._run_id, phase=self.phase, span=self.span_id,
                   attributes=self.attributes, error=error,
                   error_type=None if kind is None else kind.__name__)


class _NoSpan:
    """The span of a run nobody observes: nothing is built, nothing is sent."""

    __slots__ = ()

    def set(self, **attributes: Any) -> None:
        pass

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        pass


NO_SPAN = _NoSpan()


@attrs.frozen
class Stop:
    """A request to stop a run at its next step boundary (``RunContext.request_stop``)."""

    kind: str
    """``"cancel"`` or ``"pause"``."""
    reason: str


@attrs.define(eq=False)
class RunContext:
    """What a hook needs to know about the run it serves, and the budget it spends from.

    ``tools`` is every registered tool (read-only); the tools the principal may
    call are the ``tools`` argument of ``agentkeel_plan``. A planner that turns
    down a proposal naming a registered tool the principal may not call reports
    it with ``refused``, so the refusal is in the audit log like every other
    permission decision.
    """

    request: AgentRequest
    principal: Principal
    config: Config
    budget: Budget
    pricer: Pricer
    tools: Mapping[str, ToolSpec] = attrs.field(factory=dict)
    costs: list[CostRecord] = attrs.field(factory=list)
    on_refused: Callable[[str, str], None] | None = attrs.field(default=None, repr=False)
    observers: Callable[..., None] | None = attrs.field(default=None, repr=False)
    """``plugins.event`` when some plugin observes events, else None."""
    sink: Callable[[Event], None] | None = attrs.field(default=None, repr=False)
    """The caller's listener for this run's events (``AgentSystem.stream``), if any."""
    context_report: ContextReport | None = attrs.field(default=None, repr=False)
    """What the memory manager put in this run's prompts and left out (``MemoryContext.report``)."""
    stop: Stop | None = attrs.field(default=None, repr=False)
    """Set by ``request_stop``: the executor stops at the next step boundary."""
    trace: dict[str, str] = attrs.field(factory=dict, repr=False)
    """Trace context of this run for a tracing plugin to fill (W3C ``traceparent``, ...): journaled
    with the run, so a resumed run can link to the trace it began in (``earlier_trace``)."""
    earlier_trace: Mapping[str, str] | None = attrs.field(default=None, repr=False)
    """On resume, rollback or cancel: the ``trace`` journaled when the run began (None if none)."""
    _spans: int = attrs.field(default=0, init=False, repr=False)

    def request_stop(self, kind: str, reason: str) -> None:
        """Stop the run before its next step: ``"cancel"`` ends it ``cancelled`` (the steps
        that took effect are compensated); ``"pause"`` leaves it ``running`` and resumable
        (a server shutting down). The first request wins; a cancel overrides a pause."""
        if kind not in ("cancel", "pause"):
            raise ValueError(f"stop kind must be 'cancel' or 'pause', got {kind!r}")
        if self.stop is None or (kind == "cancel" and self.stop.kind == "pause"):
            self.stop = Stop(kind, reason)

    @property
    def run_id(self) -> str:
        return self.request.run_id

    @property
    def listened(self) -> bool:
        """True when an event would reach anyone (so callers can skip building its data)."""
        return self.sink is not None or self.observers is not None

    def emit(self, kind: str, **data: Any) -> None:
        """Send an event of this run to the observer plugins and the caller's listener."""
        if self.observers is not None:
            self.observers(kind, self.request.run_id, **data)
        if self.sink is not None:
            self.sink(Event(kind=kind, run_id=self.request.run_id, data=data))

    def observe(self, kind: str, **data: Any) -> None:
        """Send an event to the observer plugins only (not to the run's stream)."""
        if self.observers is not None:
            self.observers(kind, self.request.run_id, **data)

    def span(self, phase: str, **attributes: Any) -> Span | _NoSpan:
        """A context manager around one phase of the run (``permissions``, ``memory``, ``plan``,
        ``llm``, ``plan_check``, ``step``, ``evaluate``, ``recover``, ``compensate``,
        ``respond``), for observers; a shared no-op when no plugin observes events."""
        if self.observers is None:
            return NO_SPAN
        self._spans += 1
        return Span(self.observers, self.request.run_id, phase, self._spans, attributes)

    def refused(self, tool: str, reason: str) -> None:
        """Record that a planner refused ``tool`` on permission grounds (an audit record)."""
        if self.on_refused is not None:
            self.on_refused(tool, reason)

    def reserve_llm(
        self, model: str, messages: Iterable[Mapping[str, Any]], max_tokens: int, *, purpose: str = "plan",
        reason: str = "",
    ) -> Reservation:
        """Reserve the worst-case cost of one chat completion before making it, against the
        run's budget and every budget scope that applies (``purpose``/``reason`` go to the ledger)."""
        worst = self.pricer.worst_case_for_messages(model, messages, max_tokens)
        return self.budget.reserve(worst, f"a call to {model}", purpose=purpose, reason=reason)

    def settle_llm(
        self, reservation: Reservation, *, model: str, tier: str | None, usage: Usage, estimated: bool = False
    ) -> CostRecord:
        """Settle a reservation to the real usage (or, ``estimated``, to a guess of it): the
        cost goes to the run's costs and, with the reservation's reason, to the ledger."""
        cost = self.pricer.cost(model, usage)
        record = CostRecord(kind="llm", cost_usd=cost, model=model, tier=tier, usage=usage, estimated=estimated,
                            purpose=reservation.purpose, reason=reservation.reason)
        reservation.settle(cost, record)
        self.costs.append(record)
        return record
