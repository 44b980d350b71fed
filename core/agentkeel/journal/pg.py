"""The shared journal on PostgreSQL: tables ``runs``, ``steps``, ``plan_revisions`` and
``approvals`` (``agentkeel.pg_schema.journal``), selected by ``[store] url``, so every
replica of the service sees and fences the same runs.

Promises, on top of the ``agentkeel.journal.Journal`` protocol (the semantics of
``SQLiteJournal``, checked by ``tests/journal/conformance.py``):

- Safe across threads, processes and hosts: each call is one transaction on a pooled
  connection (``agentkeel.pg.database``, shared by every store on the URL). Every fenced
  write checks the run's epoch and holder under the run row's lock, in the transaction
  that writes: ``intent`` and ``outcome`` are one ``INSERT ... SELECT ... FROM runs WHERE
  epoch = .. AND owner = .. FOR UPDATE``; ``renew``, ``release`` and ``set_status`` one
  conditional ``UPDATE``; ``acquire``, ``revise_plan`` and ``request_approval`` read the
  run ``FOR UPDATE`` first. A takeover's ``UPDATE`` and a stale writer's statement wait
  for each other's row lock, and the later re-reads the row as committed, so once an
  ``acquire`` has returned no write under an older lease succeeds (in any process).
- ``acquire`` follows the owner-liveness rules of ``check_takeover``: a holder is taken
  over when its lease has expired, or when it is a process *of the host making the call*
  that is provably gone. Replicas on other hosts cannot see each other's processes:
  between them only expiry frees a run.
- ``decide_approval`` is one conditional ``UPDATE ... WHERE status = 'pending' AND
  expires_at > now``: of two deciders, in any processes, exactly one wins; an expiry it
  finds is committed even though the call raises.
- ``load`` reads the run, its steps and its revisions in one snapshot (``REPEATABLE READ``).
- JSON values are stored as the JSON text ``agentkeel.journal.base.encode`` makes and
  parsed by the same decoder as SQLite's, so ``load`` returns exactly what SQLite's does.
- Each call has committed when it returns; how durable a commit is is the server's
  ``synchronous_commit`` (``on`` by default: flushed to its WAL before the call returns).
- PostgreSQL text cannot hold NUL characters: a write with one in a text field (a message,
  an owner, a tool's error...) is refused with ``JournalRecordError`` naming the field,
  writing nothing; a lookup by a run id with one finds no run (none could be stored).
  JSON values are unaffected (the encoder escapes NUL as ``\\u0000``).
- A server that cannot be reached, or a statement that fails for a reason other than the
  caller's input, raises ``StoreError`` naming the server (never its password) and what
  failed.
- ``close`` closes this handle only (later use raises ``StoreError``); the pool is the
  process's, shared by every store on the URL. After a fork, the child opens its own pool.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg

import agentkeel.pg as pg
from agentkeel.errors import JournalRecordError, RunExistsError, StoreError
from agentkeel.journal.base import (
    DEFAULT_TTL_S,
    STEP_COLUMNS,
    ApprovalRecord,
    Lease,
    PlanRecord,
    RunRecord,
    RunState,
    StepRecord,
    approval_from_row,
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
    run_from_row,
)

__all__ = ["PostgresJournal"]

_T = TypeVar("_T")
Conn = psycopg.Connection[Any]

_RUN_COLUMNS = (
    "run_id, user_id, session_id, message, principal, budget_usd, plan, status, detail, "
    "created_at, updated_at, owner, epoch, lease_expires_at, planning_cost_usd, context"
)
# As SQLite's: step writes do not touch the run row's columns; a run's updated_at is read
# as the later of its own and its last step's timestamp.
_SELECT_RUNS = (
    "SELECT run_id, user_id, session_id, message, principal, budget_usd, plan, status, detail, "
    "created_at, GREATEST(updated_at, (SELECT ts FROM steps WHERE steps.run_id = runs.run_id "
    "ORDER BY seq DESC LIMIT 1)), owner, epoch, lease_expires_at, planning_cost_usd, "
    "then_status, answer, context FROM runs"
)
_STEP_TYPES = ("bigint", "text", "text", "text", "text", "text", "text", "text", "text",
               "double precision", "double precision", "bigint", "text", "double precision")
assert len(_STEP_TYPES) == len(STEP_COLUMNS)
# One statement: the fence (the run row, locked) and the insert are atomic.
_INSERT_STEP = (
    f"INSERT INTO steps (run_id, {', '.join(STEP_COLUMNS)}) "
    f"SELECT run_id, {', '.join(f'%s::{t}' for t in _STEP_TYPES)} FROM runs "
    "WHERE run_id = %s AND epoch = %s AND owner = %s FOR UPDATE"
)
_SELECT_STEPS = f"SELECT {', '.join(STEP_COLUMNS)} FROM steps WHERE run_id = %s ORDER BY seq"
_INSERT_REVISION = (
    "INSERT INTO plan_revisions (run_id, revision, reason, plan, planning_cost_usd, ts) "
    "VALUES (%s, %s, %s, %s, %s, %s)"
)
_SELECT_REVISIONS = (
    "SELECT revision, reason, plan, planning_cost_usd, ts FROM plan_revisions WHERE run_id = %s "
    "ORDER BY revision"
)
_APPROVAL_COLUMNS = (
    "run_id, step_id, tool_name, args, requested_by, requested_at, expires_at, status, decided_by, decided_at, reason"
)
_SELECT_APPROVAL = f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE run_id = %s AND step_id = %s"
# list_approvals: which stored rows have each status_at(now) (a pending one past its expiry reads expired)
_APPROVALS_WHERE = {
    None: "TRUE",
    "pending": "status = 'pending' AND expires_at > %(now)s",
    "expired": "status = 'expired' OR (status = 'pending' AND expires_at <= %(now)s)",
    "approved": "status = 'approved'",
    "denied": "status = 'denied'",
}
_RUN_EXISTS = (
    "run {run_id!r} is already in the journal; use a new run id, or acquire the existing run to resume it"
)


class PostgresJournal:
    """The journal in the PostgreSQL database at ``url`` (migrated on first use).

    ``clock`` gives the time used for timestamps and lease expiry (inject one in tests;
    every replica sharing the database should use the real one). Opening connects, so an
    unreachable server fails here.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.label = pg.redact(url)
        self._clock = clock
        self._closed = False
        self._lock = threading.Lock()
        self._run("open", lambda conn: None)

    def _run(self, what: str, fn: Callable[[Conn], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError(f"the journal at {self.label} is closed; open a new PostgresJournal")
        try:
            return pg.database(self.url).run(what, fn)
        except psycopg.Error as exc:  # not the caller's input (that is checked before): the store's
            raise StoreError(f"the journal at {self.label}: {what} failed: {exc}") from exc

    # --- runs and leases --------------------------------------------------------

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
        _check_text(f"run {run_id!r}", run_id=run_id, user_id=user_id, session_id=session_id, message=message,
                    principal=principal, owner=owner)
        plan_json = encode(plan, f"the plan of run {run_id!r}")
        context_json = "" if context is None else encode(context, f"the memory report of run {run_id!r}")
        budget = None if budget_usd is None else float(budget_usd)
        cost = float(planning_cost_usd)

        def write(conn: Conn) -> Lease:
            now = self._clock()
            lease = Lease(run_id, owner, 1, now + ttl_s)
            inserted = conn.execute(
                f"INSERT INTO runs ({_RUN_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, 'running', '', %s, %s, %s, 1, %s, %s, %s) "
                "ON CONFLICT (run_id) DO NOTHING",
                (run_id, user_id, session_id, message, principal, budget, plan_json, now, now, owner,
                 lease.expires_at, cost, context_json),
            ).rowcount
            if inserted != 1:
                raise RunExistsError(_RUN_EXISTS.format(run_id=run_id), run_id=run_id)
            conn.execute(_INSERT_REVISION, (run_id, 1, "initial", plan_json, cost, now))
            return lease

        return self._run("create_run", write)

    def revise_plan(self, lease: Lease, plan: dict[str, Any], reason: str, planning_cost_usd: float = 0.0) -> int:
        plan_json, reason, cost = check_revision(lease.run_id, plan, reason, planning_cost_usd)

        def write(conn: Conn) -> int:
            self._fence(conn, lease)
            now = self._clock()
            row = conn.execute(
                "SELECT MAX(revision) FROM plan_revisions WHERE run_id = %s", (lease.run_id,)
            ).fetchone()
            latest = row[0] if row is not None else None
            if latest is None:  # no revision 1 stored (never written by this journal): store it as load reads it
                conn.execute(
                    "INSERT INTO plan_revisions (run_id, revision, reason, plan, planning_cost_usd, ts) "
                    "SELECT run_id, 1, 'initial', plan, planning_cost_usd, created_at FROM runs WHERE run_id = %s",
                    (lease.run_id,),
                )
                latest = 1
            revision = int(latest) + 1
            conn.execute(_INSERT_REVISION, (lease.run_id, revision, reason, plan_json, cost, now))
            conn.execute(
                "UPDATE runs SET plan = %s, planning_cost_usd = planning_cost_usd + %s, then_status = '', "
                "updated_at = %s WHERE run_id = %s",
                (plan_json, cost, now, lease.run_id),
            )
            return revision

        return self._run("revise_plan", write)

    def acquire(self, run_id: str, owner: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        if not _storable(run_id):
            raise not_found(run_id)
        _check_text(f"the lease of run {run_id!r}", owner=owner)

        def take(conn: Conn) -> Lease:
            row = conn.execute(
                "SELECT owner, epoch, lease_expires_at FROM runs WHERE run_id = %s FOR UPDATE", (run_id,)
            ).fetchone()
            if row is None:
                raise not_found(run_id)
            holder, epoch, expires_at = row
            now = self._clock()
            check_takeover(run_id, holder, expires_at, owner, now)
            lease = Lease(run_id, owner, int(epoch) + 1, now + ttl_s)
            conn.execute(
                "UPDATE runs SET owner = %s, epoch = %s, lease_expires_at = %s, updated_at = %s WHERE run_id = %s",
                (owner, lease.epoch, lease.expires_at, now, run_id),
            )
            return lease

        return self._run("acquire", take)

    def renew(self, lease: Lease, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        self._check_lease(lease)

        def write(conn: Conn) -> Lease:
            now = self._clock()
            renewed = Lease(lease.run_id, lease.owner, lease.epoch, now + ttl_s)
            cur = conn.execute(
                "UPDATE runs SET lease_expires_at = %s WHERE run_id = %s AND epoch = %s AND owner = %s",
                (renewed.expires_at, lease.run_id, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                raise self._refusal(conn, lease)
            return renewed

        return self._run("renew", write)

    def release(self, lease: Lease) -> None:
        self._check_lease(lease)

        def write(conn: Conn) -> None:
            cur = conn.execute(
                "UPDATE runs SET owner = '', lease_expires_at = 0, updated_at = %s "
                "WHERE run_id = %s AND epoch = %s AND owner = %s",
                (self._clock(), lease.run_id, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                if self._holder(conn, lease.run_id) == (lease.epoch, ""):
                    return  # already released under this lease
                raise self._refusal(conn, lease)

        self._run("release", write)

    def set_status(
        self, lease: Lease, status: str, detail: str = "", then_status: str = "", answer: str | None = None
    ) -> None:
        self._check_lease(lease)
        status = getattr(status, "value", status)
        then_status = getattr(then_status, "value", then_status)
        new_answer = None if answer is None else str(answer)
        _check_text(f"the status of run {lease.run_id!r}", status=status, detail=detail, then_status=then_status,
                    answer=new_answer)

        def write(conn: Conn) -> None:
            cur = conn.execute(
                "UPDATE runs SET status = %s, detail = %s, then_status = %s, "
                "answer = COALESCE(%s::text, answer), updated_at = %s "
                "WHERE run_id = %s AND epoch = %s AND owner = %s",
                (status, detail, then_status, new_answer, self._clock(), lease.run_id, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                raise self._refusal(conn, lease)

        self._run("set_status", write)

    # --- steps ----------------------------------------------------------------------

    def intent(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "intent")
        self._append(lease, record)

    def outcome(self, lease: Lease, record: StepRecord) -> None:
        check_record(record, "outcome")
        self._append(lease, record)

    def write_steps(self, lease: Lease, records: Sequence[StepRecord]) -> None:
        self._check_lease(lease)
        check_records(records)
        now = self._clock()
        params = []
        for record in records:
            row = encode_step(record, now)
            _check_text(f"step {record.step_id} ({record.kind} {record.phase})", tool_name=row[3],
                        idempotency_key=row[5], status=row[6], error=row[8])
            params.append((*row, lease.run_id, lease.epoch, lease.owner))

        def write(conn: Conn) -> None:
            for values in params:
                if conn.execute(_INSERT_STEP, values).rowcount != 1:
                    raise self._refusal(conn, lease)

        if params:
            self._run(f"writing steps {', '.join(str(r.step_id) for r in records)}", write)

    def _append(self, lease: Lease, record: StepRecord) -> None:
        self._check_lease(lease)
        row = encode_step(record, self._clock())
        _check_text(f"step {record.step_id} ({record.kind} {record.phase})", tool_name=row[3],
                    idempotency_key=row[5], status=row[6], error=row[8])
        params = (*row, lease.run_id, lease.epoch, lease.owner)

        def write(conn: Conn) -> None:
            if conn.execute(_INSERT_STEP, params).rowcount != 1:
                raise self._refusal(conn, lease)

        self._run(f"writing step {record.step_id}", write)

    # --- approvals ---------------------------------------------------------------------

    def request_approval(
        self, lease: Lease, step_id: int, tool_name: str, args: Mapping[str, Any], requested_by: str, ttl_s: float
    ) -> ApprovalRecord:
        self._check_lease(lease)
        step_id = int(step_id)
        args_json, ttl = check_approval_request(lease, step_id, args, ttl_s)
        _check_text(f"the approval of step {step_id}", tool_name=tool_name, requested_by=requested_by)

        def write(conn: Conn) -> ApprovalRecord:
            self._fence(conn, lease)  # the run row stays locked: one request per step at a time
            row = conn.execute(_SELECT_APPROVAL, (lease.run_id, step_id)).fetchone()
            if row is not None:
                return approval_from_row(row)  # requested before: unchanged, nothing written
            now = self._clock()
            inserted = conn.execute(
                "INSERT INTO approvals (run_id, step_id, tool_name, args, requested_by, requested_at, expires_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_APPROVAL_COLUMNS}",
                (lease.run_id, step_id, tool_name, args_json, requested_by, now, now + ttl),
            ).fetchone()
            assert inserted is not None
            return approval_from_row(inserted)

        return self._run("request_approval", write)

    def approval(self, run_id: str, step_id: int) -> ApprovalRecord | None:
        if not _storable(run_id):
            return None

        def read(conn: Conn) -> ApprovalRecord | None:
            row = conn.execute(_SELECT_APPROVAL, (run_id, int(step_id))).fetchone()
            return None if row is None else approval_from_row(row)

        return self._run("approval", read)

    def decide_approval(
        self, run_id: str, step_id: int, *, approved: bool, by: str, reason: str = ""
    ) -> ApprovalRecord:
        step_id = int(step_id)
        check_decider(run_id, step_id, by)
        if not _storable(run_id):
            raise no_approval(run_id, step_id)
        _check_text(f"the decision on step {step_id} of run {run_id!r}", by=by, reason=str(reason))
        decision = "approved" if approved else "denied"

        def write(conn: Conn) -> tuple[ApprovalRecord | None, bool, float]:
            now = self._clock()
            # One conditional statement decides: of two deciders, the second waits for the first's
            # row lock, then finds it no longer pending.
            row = conn.execute(
                "UPDATE approvals SET status = %s, decided_by = %s, decided_at = %s, reason = %s "
                "WHERE run_id = %s AND step_id = %s AND status = 'pending' AND expires_at > %s "
                f"RETURNING {_APPROVAL_COLUMNS}",
                (decision, by, now, str(reason), run_id, step_id, now),
            ).fetchone()
            if row is not None:
                return approval_from_row(row), True, now
            conn.execute(
                "UPDATE approvals SET status = 'expired' "
                "WHERE run_id = %s AND step_id = %s AND status = 'pending' AND expires_at <= %s",
                (run_id, step_id, now),
            )
            row = conn.execute(_SELECT_APPROVAL, (run_id, step_id)).fetchone()
            return (None if row is None else approval_from_row(row)), False, now

        # The transaction commits before anything is raised: a found expiry is kept.
        record, decided, now = self._run("decide_approval", write)
        if record is None:
            raise no_approval(run_id, step_id)
        if not decided:
            raise approval_refusal(record, now)
        return record

    def list_approvals(self, status: str | None = "pending", limit: int = 50) -> list[ApprovalRecord]:
        status = check_listed_status(status)
        where = _APPROVALS_WHERE[status]
        count = max(0, int(limit))

        def read(conn: Conn) -> list[ApprovalRecord]:
            rows = conn.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE {where} "
                "ORDER BY requested_at DESC, seq DESC LIMIT %(limit)s",
                {"now": self._clock(), "limit": count},
            ).fetchall()
            return [approval_from_row(row) for row in rows]

        return self._run("list_approvals", read)

    # --- reads --------------------------------------------------------------------------

    def load(self, run_id: str) -> RunState:
        if not _storable(run_id):
            raise not_found(run_id)

        def read(conn: Conn) -> tuple[tuple[Any, ...], list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            # one snapshot for the run, its steps and its revisions
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = conn.execute(f"{_SELECT_RUNS} WHERE run_id = %s", (run_id,)).fetchone()
            if row is None:
                raise not_found(run_id)
            steps = conn.execute(_SELECT_STEPS, (run_id,)).fetchall()
            revisions = conn.execute(_SELECT_REVISIONS, (run_id,)).fetchall()
            return row, steps, revisions

        row, steps, revisions = self._run("load", read)
        run = run_from_row(row)
        plans = tuple(PlanRecord(n, why, decode(plan), cost, ts) for n, why, plan, cost, ts in revisions)
        if not plans:  # no revision stored: the run's plan is its revision 1
            plans = (PlanRecord(1, "initial", run.plan, run.planning_cost_usd, run.created_at),)
        return RunState(run, tuple(decode_step(s) for s in steps), plans)

    def list_runs(self, limit: int = 50, *, user_id: str | None = None) -> list[RunRecord]:
        count = max(0, int(limit))
        if user_id is not None and not _storable(user_id):
            return []

        def read(conn: Conn) -> list[tuple[Any, ...]]:
            if user_id is None:
                return conn.execute(
                    f"{_SELECT_RUNS} ORDER BY created_at DESC, seq DESC LIMIT %s", (count,)
                ).fetchall()
            return conn.execute(
                f"{_SELECT_RUNS} WHERE user_id = %s ORDER BY created_at DESC, seq DESC LIMIT %s",
                (user_id, count),
            ).fetchall()

        return [run_from_row(row) for row in self._run("list_runs", read)]

    def abandoned_runs(self, now: float, limit: int = 100) -> list[RunRecord]:
        count = max(0, int(limit))

        def read(conn: Conn) -> list[tuple[Any, ...]]:
            return conn.execute(
                f"{_SELECT_RUNS} WHERE status IN ('running', 'rolling_back') "
                "AND (owner = '' OR lease_expires_at <= %s) ORDER BY created_at, seq LIMIT %s",
                (float(now), count),
            ).fetchall()

        return [run_from_row(row) for row in self._run("abandoned_runs", read)]

    def close(self) -> None:
        """This handle only (the pool is shared by every store on the URL); idempotent."""
        with self._lock:
            self._closed = True

    # --- helpers --------------------------------------------------------------------

    @staticmethod
    def _check_lease(lease: Lease) -> None:
        if not _storable(lease.run_id):
            raise not_found(lease.run_id)

    @staticmethod
    def _holder(conn: Conn, run_id: str, *, lock: bool = False) -> tuple[int, str] | None:
        row = conn.execute(
            "SELECT epoch, owner FROM runs WHERE run_id = %s" + (" FOR UPDATE" if lock else ""), (run_id,)
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def _fence(self, conn: Conn, lease: Lease) -> None:
        """Lock the run row for the rest of the transaction; raise unless ``lease`` holds it."""
        row = self._holder(conn, lease.run_id, lock=True)
        if row is None:
            raise not_found(lease.run_id)
        if row != (lease.epoch, lease.owner):
            raise fenced(lease, row[0], row[1])

    def _refusal(self, conn: Conn, lease: Lease) -> Exception:
        row = self._holder(conn, lease.run_id)
        if row is None:
            return not_found(lease.run_id)
        return fenced(lease, row[0], row[1])

    def __repr__(self) -> str:
        return f"PostgresJournal({self.label!r})"


def _storable(text: Any) -> bool:
    """Whether PostgreSQL text can hold ``text``; a lookup by what it cannot hold matches nothing."""
    return not isinstance(text, str) or "\x00" not in text


def _check_text(what: str, **fields: Any) -> None:
    for name, value in fields.items():
        if isinstance(value, str) and "\x00" in value:
            raise JournalRecordError(
                f"cannot journal {what}: its {name} holds a NUL character, which PostgreSQL text cannot store"
            )
