"""The lease a process holds while it works on a run.

``HeldLease`` is a context manager: however the work ends (returns, raises, is
cancelled), the lease is released on exit, so a run is never left held for
``lease_ttl_s`` by a process that has stopped working on it. Every journal
write of the run goes through it, with the current (renewed) lease.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any

from agentkeel.errors import FencedError, StoreError
from agentkeel.journal.base import Journal, Lease, StepRecord
from agentkeel.types import RunStatus

log = logging.getLogger("agentkeel")

MAX_DEFERRED = 64
"""The most step records a run holds back for its next journal write: a crash re-runs at most
this many retry-safe steps (they also wait at most a third of the lease, ``lease_ttl_s / 3``)."""


class HeldLease:
    """A lease on one run, renewed as work goes on and released on exit."""

    def __init__(self, journal: Journal, lease: Lease, ttl_s: float) -> None:
        self.journal = journal
        self.lease = lease
        self.ttl_s = ttl_s
        self._timer: asyncio.TimerHandle | None = None
        self._deferred: list[StepRecord] = []

    def __enter__(self) -> HeldLease:
        self._watch()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._unwatch()
        try:
            self.flush()
        except (FencedError, StoreError):
            if exc is None:
                raise
            # an error is already on its way out; the held-back records are of retry-safe steps
        try:
            self.journal.release(self.lease)
        except FencedError:
            if exc is None:
                raise  # another process took the run over while we thought we held it
            # an error is already on its way out; the takeover is the lesser news

    def _watch(self) -> None:
        """Renew the lease every third of its time-to-live while the run is held, whatever it
        is doing (a slow tool call, a slow planner), so only a process that stops making
        progress loses it. One timer per run, not per step: the per-step path pays nothing."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # held outside an event loop: renewed between steps only
            return
        self._timer = loop.call_later(self.ttl_s / 3, self._renew)

    def _unwatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _renew(self) -> None:
        try:
            self.flush()  # deferred records wait at most a third of the lease
            self.keep()
        except (FencedError, StoreError) as exc:  # the next write of the run raises it for real
            log.warning("could not renew the lease of run %s: %s", self.lease.run_id, exc)
            self._timer = None
            return
        self._watch()

    def keep(self) -> None:
        """Renew the lease when half of it has run out."""
        if time.time() > self.lease.expires_at - self.ttl_s / 2:
            self.lease = self.journal.renew(self.lease, self.ttl_s)

    def intent(self, record: StepRecord) -> None:
        """Journal an intent, committed before returning (with any deferred records before it)."""
        if self._deferred:
            self._write([*self._deferred, record])
        else:
            self.journal.intent(self.lease, record)

    def deferred_intent(self, record: StepRecord) -> None:
        """Journal the intent of a step whose tool is retry-safe and has no rollback tool with the
        run's next journal write, not now. Lost to a crash, the step is simply not known to have
        started: a resume runs it (which its tool makes safe), and there is nothing a rollback
        would have to undo. The audit log has the call's permission decision all the same."""
        self._deferred.append(record)
        if len(self._deferred) >= MAX_DEFERRED:
            self.flush()

    def outcome(self, record: StepRecord, *, defer: bool = False) -> None:
        """Journal an outcome. ``defer`` (for a tool that is retry-safe only) lets it wait for the
        run's next journal write and be committed in the same transaction: one commit per step
        instead of two. Lost to a crash before that write, it only means the step runs again on
        resume, which its tool makes safe (idempotent, or the same idempotency key)."""
        if defer:
            self._deferred.append(record)
            if len(self._deferred) >= MAX_DEFERRED:
                self.flush()
        elif self._deferred:
            self._write([*self._deferred, record])
        else:
            self.journal.outcome(self.lease, record)

    def flush(self) -> None:
        """Commit the held-back records now."""
        if self._deferred:
            self._write(list(self._deferred))

    def _write(self, records: list[StepRecord]) -> None:
        """``records``: the held-back records, maybe one more after them; one transaction."""
        deferred = len(self._deferred)
        self.journal.write_steps(self.lease, records)
        del self._deferred[:deferred]  # only once committed: a failed write keeps them for the next

    def set_status(
        self, status: RunStatus, detail: str = "", then_status: RunStatus | str | None = None, answer: str | None = None
    ) -> None:
        self.flush()
        then = then_status.value if isinstance(then_status, RunStatus) else (then_status or "")
        if answer is None:
            self.journal.set_status(self.lease, status.value, detail, then)
        else:
            self.journal.set_status(self.lease, status.value, detail, then, answer=answer)

    def revise_plan(self, plan: dict[str, Any], reason: str, planning_cost_usd: float) -> int:
        self.flush()
        return self.journal.revise_plan(self.lease, plan, reason, planning_cost_usd)
