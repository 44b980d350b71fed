"""The in-process journal: the ``Journal`` protocol in a dict, for non-durable runs.

Same semantics as ``SQLiteJournal`` (leases, epochs, fencing, JSON round trip,
ordering), checked by the same conformance suite, but nothing survives the
process. Thread-safe: one lock guards every call. Values are stored as JSON
text, so a caller mutating what it passed in or got back cannot change the
journal.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from agentkeel.errors import RunExistsError
from agentkeel.journal.base import (
    DEFAULT_TTL_S,
    Lease,
    RunRecord,
    RunState,
    StepRecord,
    StepRow,
    check_record,
    check_takeover,
    decode,
    decode_step,
    encode,
    encode_step,
    fenced,
    not_found,
)

__all__ = ["MemoryJournal"]


@attrs.define
class _Run:
    record: RunRecord  # plan held as {} here; the JSON text is in plan_json
    plan_json: str
    seq: int
    steps: list[StepRow] = attrs.field(factory=list)
    last_step_ts: float = 0.0  # kept apart so a step write does not rebuild the record

    def snapshot(self) -> RunRecord:
        updated_at = max(self.record.updated_at, self.last_step_ts)
        return attrs.evolve(self.record, plan=decode(self.plan_json), updated_at=updated_at)


class MemoryJournal:
    """A journal that lives in this process only. ``clock`` as for ``SQLiteJournal``."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._seq = itertools.count()

    def create_run(
        self,
        *,
        run_id: str,
        user_id: str,
        session_id: str,
        message: str,
        principal: str,
        budget_usd: float | None,
        plan: dict[str, Any],
        owner: str,
        ttl_s: float = DEFAULT_TTL_S,
        planning_cost_usd: float = 0.0,
    ) -> Lease:
        plan_json = encode(plan, f"the plan of run {run_id!r}")
        with self._lock:
            if run_id in self._runs:
                raise RunExistsError(
                    f"run {run_id!r} is already in the journal; use a new run id, "
                    "or acquire the existing run to resume it",
                    run_id=run_id,
                )
            now = self._clock()
            lease = Lease(run_id, owner, 1, now + ttl_s)
            record = RunRecord(
                run_id=run_id,
                user_id=user_id,
                session_id=session_id,
                message=message,
                principal=principal,
                budget_usd=None if budget_usd is None else float(budget_usd),
                plan={},
                status="running",
                detail="",
                created_at=now,
                updated_at=now,
                owner=owner,
                epoch=1,
                lease_expires_at=lease.expires_at,
                planning_cost_usd=float(planning_cost_usd),
            )
            self._runs[run_id] = _Run(record, plan_json, next(self._seq))
            return lease

    def acquire(self, run_id: str, owner: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        with self._lock:
            run = self._get(run_id)
            now = self._clock()
            rec = run.record
            check_takeover(run_id, rec.owner, rec.lease_expires_at, owner, now)
            lease = Lease(run_id, owner, rec.epoch + 1, now + ttl_s)
            run.record = attrs.evolve(
                rec,
                owner=owner,
                epoch=lease.epoch,
                lease_expires_at=lease.expires_at,
                updated_at=now,
            )
            return lease

    def renew(self, lease: Lease, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        with self._lock:
            run = self._fenced_run(lease)
            renewed = Lease(lease.run_id, lease.owner, lease.epoch, self._clock() + ttl_s)
            run.record = attrs.evolve(run.record, lease_expires_at=renewed.expires_at)
            return renewed

    def release(self, lease: Lease) -> None:
        with self._lock:
            run = self._get(lease.run_id)
            rec = run.record
            if rec.epoch == lease.epoch and rec.owner == "":
                return  # already released under this lease
            run = self._fenced_run(lease)
            run.record = attrs.evolve(rec, owner="", lease_expires_at=0.0, updated_at=self._clock())

    def set_status(self, lease: Lease, status: str, detail: str = "", then_status: str = "") -> None:
        then_status = getattr(then_status, "value", then_status)
        with self._lock:
            run = self._fenced_run(lease)
            run.record = attrs.evolve(
                run.record, status=status, detail=detail, then_status=then_status, updated_at=self._clock()
            )

    def intent(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "intent")
        self._append(lease, record)

    def outcome(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "outcome")
        self._append(lease, record)

    def _append(self, lease: Lease, record: StepRecord) -> None:
        row = encode_step(record, self._clock())  # encode outside the lock: may raise
        with self._lock:
            run = self._fenced_run(lease)
            run.steps.append(row)
            run.last_step_ts = max(run.last_step_ts, row[-1])

    def load(self, run_id: str) -> RunState:
        with self._lock:
            run = self._get(run_id)
            record, rows = run.snapshot(), tuple(run.steps)
        return RunState(record, tuple(decode_step(r) for r in rows))

    def list_runs(self, limit: int = 50) -> list[RunRecord]:
        with self._lock:
            runs = sorted(self._runs.values(), key=lambda r: (r.record.created_at, r.seq))
            runs = runs[::-1][: max(0, limit)]
            return [run.snapshot() for run in runs]

    def close(self) -> None:
        """Nothing to release; the runs stay readable until the object is dropped."""

    def _get(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is None:
            raise not_found(run_id)
        return run

    def _fenced_run(self, lease: Lease) -> _Run:
        run = self._get(lease.run_id)
        rec = run.record
        if rec.epoch != lease.epoch or rec.owner != lease.owner:
            raise fenced(lease, rec.epoch, rec.owner)
        return run

    def __repr__(self) -> str:
        return f"MemoryJournal({len(self._runs)} runs)"
