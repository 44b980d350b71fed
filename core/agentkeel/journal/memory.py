"""The in-process journal: the ``Journal`` protocol in a dict, for non-durable runs.

Same semantics as ``SQLiteJournal`` (leases, epochs, fencing, JSON round trip,
ordering, plan revisions, approvals), checked by the same conformance suite, but
nothing survives the process. Thread-safe: one lock guards every call. Values
are stored as JSON text, so a caller mutating what it passed in or got back
cannot change the journal.

The argument checks and the approval errors below (``check_revision`` ...
``approval_refusal``) are shared with ``SQLiteJournal`` so both backends refuse
the same things with the same words.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from agentkeel.errors import RunExistsError
from agentkeel.journal.base import (
    ABANDONABLE,
    DEFAULT_TTL_S,
    ApprovalRecord,
    Lease,
    PlanRecord,
    RunRecord,
    RunState,
    StepRecord,
    StepRow,
    approval_refusal,
    check_approval_request,
    check_decider,
    check_listed_status,
    check_record,
    check_records,
    check_revision,
    check_takeover,
    decode,
    decode_step,
    encode,
    encode_step,
    fenced,
    no_approval,
    not_found,
)

__all__ = ["MemoryJournal"]


# --- checks and errors shared with SQLiteJournal ------------------------------------------


# --- the journal -------------------------------------------------------------------------

RevisionRow = tuple[int, str, str, float, float]
"""A plan revision as stored: revision, reason, plan as JSON text, planning cost, ts."""


@attrs.define
class _Run:
    record: RunRecord  # plan held as {} here; the JSON text is in plan_json
    plan_json: str
    seq: int
    steps: list[StepRow] = attrs.field(factory=list)
    last_step_ts: float = 0.0  # kept apart so a step write does not rebuild the record
    revisions: list[RevisionRow] = attrs.field(factory=list)

    def snapshot(self) -> RunRecord:
        updated_at = max(self.record.updated_at, self.last_step_ts)
        return attrs.evolve(self.record, plan=decode(self.plan_json), updated_at=updated_at)


@attrs.define
class _Approval:
    record: ApprovalRecord  # args held as {} here; the JSON text is in args_json
    args_json: str
    seq: int

    def snapshot(self) -> ApprovalRecord:
        return attrs.evolve(self.record, args=decode(self.args_json))


class MemoryJournal:
    """A journal that lives in this process only. ``clock`` as for ``SQLiteJournal``."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._approvals: dict[tuple[str, int], _Approval] = {}
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
        context: dict[str, Any] | None = None,
    ) -> Lease:
        plan_json = encode(plan, f"the plan of run {run_id!r}")
        context_copy = None if context is None else decode(encode(context, f"the memory report of run {run_id!r}"))
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
                context=context_copy,
            )
            run = _Run(record, plan_json, next(self._seq))
            run.revisions.append((1, "initial", plan_json, record.planning_cost_usd, now))
            self._runs[run_id] = run
            return lease

    def revise_plan(self, lease: Lease, plan: dict[str, Any], reason: str, planning_cost_usd: float = 0.0) -> int:
        plan_json, reason, cost = check_revision(lease.run_id, plan, reason, planning_cost_usd)
        with self._lock:
            run = self._fenced_run(lease)
            now = self._clock()
            revision = run.revisions[-1][0] + 1
            run.revisions.append((revision, reason, plan_json, cost, now))
            run.plan_json = plan_json
            run.record = attrs.evolve(
                run.record,
                planning_cost_usd=run.record.planning_cost_usd + cost,
                then_status="",
                updated_at=now,
            )
            return revision

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

    def set_status(
        self, lease: Lease, status: str, detail: str = "", then_status: str = "", answer: str | None = None
    ) -> None:
        then_status = getattr(then_status, "value", then_status)
        with self._lock:
            run = self._fenced_run(lease)
            run.record = attrs.evolve(
                run.record,
                status=status,
                detail=detail,
                then_status=then_status,
                answer=run.record.answer if answer is None else str(answer),
                updated_at=self._clock(),
            )

    def intent(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "intent")
        self._append(lease, record)

    def outcome(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "outcome")
        self._append(lease, record)

    def write_steps(self, lease: Lease, records: Sequence[StepRecord]) -> None:
        check_records(records)
        now = self._clock()
        rows = [encode_step(record, now) for record in records]  # all encoded before any is written
        with self._lock:
            run = self._fenced_run(lease)
            run.steps.extend(rows)
            if rows:
                run.last_step_ts = max(run.last_step_ts, *(row[-1] for row in rows))

    def _append(self, lease: Lease, record: StepRecord) -> None:
        row = encode_step(record, self._clock())  # encode outside the lock: may raise
        with self._lock:
            run = self._fenced_run(lease)
            run.steps.append(row)
            run.last_step_ts = max(run.last_step_ts, row[-1])

    # --- approvals ---------------------------------------------------------------------

    def request_approval(
        self, lease: Lease, step_id: int, tool_name: str, args: Mapping[str, Any], requested_by: str, ttl_s: float
    ) -> ApprovalRecord:
        step_id = int(step_id)
        args_json, ttl = check_approval_request(lease, step_id, args, ttl_s)
        with self._lock:
            self._fenced_run(lease)
            key = (lease.run_id, step_id)
            existing = self._approvals.get(key)
            if existing is not None:
                return existing.snapshot()
            now = self._clock()
            record = ApprovalRecord(
                run_id=lease.run_id,
                step_id=step_id,
                tool_name=tool_name,
                args={},
                requested_by=requested_by,
                requested_at=now,
                expires_at=now + ttl,
            )
            approval = _Approval(record, args_json, next(self._seq))
            self._approvals[key] = approval
            return approval.snapshot()

    def approval(self, run_id: str, step_id: int) -> ApprovalRecord | None:
        with self._lock:
            approval = self._approvals.get((run_id, int(step_id)))
            return None if approval is None else approval.snapshot()

    def decide_approval(
        self, run_id: str, step_id: int, *, approved: bool, by: str, reason: str = ""
    ) -> ApprovalRecord:
        step_id = int(step_id)
        check_decider(run_id, step_id, by)
        with self._lock:
            approval = self._approvals.get((run_id, step_id))
            if approval is None:
                raise no_approval(run_id, step_id)
            now = self._clock()
            rec = approval.record
            if rec.status == "pending" and rec.expires_at > now:
                approval.record = attrs.evolve(
                    rec,
                    status="approved" if approved else "denied",
                    decided_by=by,
                    decided_at=now,
                    reason=str(reason),
                )
                return approval.snapshot()
            if rec.status == "pending":  # past its expiry: it reads as expired from now on
                approval.record = attrs.evolve(rec, status="expired")
            raise approval_refusal(approval.record, now)

    def list_approvals(self, status: str | None = "pending", limit: int = 50) -> list[ApprovalRecord]:
        status = check_listed_status(status)
        with self._lock:
            now = self._clock()
            listed = [
                a for a in self._approvals.values() if status is None or a.record.status_at(now) == status
            ]
            listed.sort(key=lambda a: (a.record.requested_at, a.seq), reverse=True)
            return [a.snapshot() for a in listed[: max(0, int(limit))]]

    # --- reads ---------------------------------------------------------------------------

    def load(self, run_id: str) -> RunState:
        with self._lock:
            run = self._get(run_id)
            record, rows, revisions = run.snapshot(), tuple(run.steps), tuple(run.revisions)
        return RunState(
            record,
            tuple(decode_step(r) for r in rows),
            tuple(PlanRecord(n, why, decode(plan), cost, ts) for n, why, plan, cost, ts in revisions),
        )

    def list_runs(self, limit: int = 50, *, user_id: str | None = None) -> list[RunRecord]:
        with self._lock:
            runs = sorted((r for r in self._runs.values() if user_id is None or r.record.user_id == user_id),
                          key=lambda r: (r.record.created_at, r.seq))
            runs = runs[::-1][: max(0, limit)]
            return [run.snapshot() for run in runs]

    def abandoned_runs(self, now: float, limit: int = 100) -> list[RunRecord]:
        with self._lock:
            runs = sorted((r for r in self._runs.values()
                           if r.record.status in ABANDONABLE and (r.record.owner == ""
                                                                  or r.record.lease_expires_at <= now)),
                          key=lambda r: (r.record.created_at, r.seq))
            return [run.snapshot() for run in runs[: max(0, limit)]]

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
