"""Durable runs: the lease a process holds while it works on a run, and resume,
rollback, resolve and show, all from the journal.

A lease is held by ``HeldLease``, a context manager: however the work ends
(returns, raises, is cancelled), the lease is released on exit, so a run is
never left held for ``lease_ttl_s`` by a process that has stopped working on it.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import time

import attrs

from agentkeel.errors import AgentkeelError, FencedError
from agentkeel.journal.base import Journal, Lease, RunState, StepRecord
from agentkeel.runtime.executor import step_result_from_record
from agentkeel.types import Plan, RunStatus, StepResult, StepStatus

if TYPE_CHECKING:
    from agentkeel.tools.registry import ToolRegistry

RESUMABLE = frozenset({RunStatus.RUNNING.value, RunStatus.WAITING.value, RunStatus.IN_DOUBT.value,
                       RunStatus.ROLLING_BACK.value})


class HeldLease:
    """A lease on one run, renewed as work goes on and released on exit."""

    def __init__(self, journal: Journal, lease: Lease, ttl_s: float) -> None:
        self.journal = journal
        self.lease = lease
        self.ttl_s = ttl_s

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.journal.release(self.lease)
        except FencedError:
            if exc is None:
                raise  # another process took the run over while we thought we held it
            # an error is already on its way out; the takeover is the lesser news

    def keep(self) -> None:
        """Renew the lease when half of it has run out."""
        if time.time() > self.lease.expires_at - self.ttl_s / 2:
            self.lease = self.journal.renew(self.lease, self.ttl_s)

    def intent(self, record: StepRecord) -> None:
        self.journal.intent(self.lease, record)

    def outcome(self, record: StepRecord) -> None:
        self.journal.outcome(self.lease, record)

    def set_status(self, status: RunStatus, detail: str = "", then_status: RunStatus | None = None) -> None:
        self.journal.set_status(self.lease, status.value, detail, then_status.value if then_status else "")


def take(journal: Journal, tools: ToolRegistry, run_id: str, owner: str, ttl_s: float) -> tuple[HeldLease, RunState]:
    """Lease a journaled run for this process; the state is read after the lease is held.

    Raises ``LeaseHeldError`` while another live process holds it, and
    ``AgentkeelError`` (with the lease released) when a tool the run needs is missing.
    """
    from agentkeel.planner.plan import plan_from_dict

    held = HeldLease(journal, journal.acquire(run_id, owner, ttl_s), ttl_s)
    with _release_on_error(held):
        state = journal.load(run_id)  # what the previous holder wrote before losing the lease
        plan = plan_from_dict(state.run.plan)
        needed = {s.tool_name for s in plan.steps} | {r.tool_name for r in state.steps}
        needed |= {spec.rollback for name in needed if (spec := tools.get(name)) and spec.rollback}
        missing = sorted(name for name in needed if name not in tools)
        if missing:
            raise AgentkeelError(
                f"run {run_id} needs tools that no loaded plugin provides: {', '.join(missing)}; install or "
                "enable the plugins that register them (see `agentkeel tools`), then try again"
            )
    return held, state


class _release_on_error:  # noqa: N801 - used like a function
    def __init__(self, held: HeldLease) -> None:
        self.held = held

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.held.__exit__(exc_type, exc, None)


def resolve(held: HeldLease, state: RunState, resolutions: dict[int, bool]) -> list[StepRecord]:
    """Record an operator's word on in-doubt steps: ``True`` it happened, ``False`` it did not."""
    written = []
    for step_id, happened in resolutions.items():
        intent, outcome = state.forward(step_id)
        if intent is None or outcome is not None:
            raise AgentkeelError(f"step {step_id} of run {state.run.run_id} is not in doubt; nothing to resolve")
        status = StepStatus.SUCCEEDED if happened else StepStatus.PENDING
        note = "it happened" if happened else "it did not happen; run it again"
        record = StepRecord(step_id, "forward", "outcome", intent.tool_name, intent.args, intent.idempotency_key,
                            status.value, None, f"resolved by an operator: {note}")
        held.outcome(record)
        written.append(record)
    return written


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


def run_duration(state: RunState) -> float:
    """How long the run itself took: from its creation to its last step record (not to
    the last status change, which a later ``rollback`` or ``show`` must not stretch)."""
    record = state.run
    last = max((s.ts for s in state.steps if s.kind == "forward"), default=record.created_at)
    return max(0.0, last - record.created_at)
