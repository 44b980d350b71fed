"""The durable journal: tables ``runs``, ``steps``, ``plan_revisions`` and ``approvals``
in ``<home>/agentkeel.db``.

Promises, on top of the ``agentkeel.journal.Journal`` protocol:

- Safe across threads and processes. Every fenced write is one conditional
  statement (``INSERT ... SELECT ... WHERE epoch = ? AND owner = ?`` or
  ``UPDATE ... WHERE epoch = ? AND owner = ?``); SQLite takes the write lock
  before such a statement reads, so the check and the write are atomic.
  ``acquire`` reads, decides and writes inside ``BEGIN IMMEDIATE``, and so do
  the writes of more than one statement (``create_run`` with its plan revision 1,
  ``revise_plan``, ``request_approval``, ``decide_approval``).
- ``decide_approval`` is one conditional ``UPDATE ... WHERE status = 'pending'
  AND expires_at > now``: of two deciders, in any processes, exactly one wins.
- Runs journaled before plan revisions existed (schema version 3) have none
  stored; ``load`` reads their ``runs.plan`` as revision 1, and ``revise_plan``
  writes that revision 1 before their revision 2.
- Each call has committed when it returns; ``intent`` and ``outcome`` are one
  ``INSERT`` each (the run row is not touched; its ``updated_at`` is read as the
  later of its own and its last step's timestamp); ``write_steps`` checks the
  fence once inside ``BEGIN IMMEDIATE`` and inserts every record in the same
  transaction. With ``synchronous="NORMAL"`` (the
  default; WAL mode) a commit survives the process being killed at any point,
  but the last commits before a power loss or kernel crash may be lost. With
  ``synchronous="FULL"`` every commit is fsynced before the call returns, which
  survives power loss as far as the disk honours fsync, at the cost of one fsync
  per intent and outcome.
- Busy waits follow ``busy_timeout_s``; a database still locked after that, or
  one that cannot be read, raises ``StoreError`` naming the file.
- After a fork, the child opens its own connection on first use.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agentkeel.errors import ConfigError, RunExistsError
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
from agentkeel.stores import DEFAULT_BUSY_TIMEOUT_S, ProcessConnection, atomic, db_path

__all__ = ["SYNCHRONOUS_MODES", "SQLiteJournal"]

SYNCHRONOUS_MODES = ("NORMAL", "FULL", "EXTRA")

_T = TypeVar("_T")

_RUN_COLUMNS = (
    "run_id, user_id, session_id, message, principal, budget_usd, plan, status, detail, "
    "created_at, updated_at, owner, epoch, lease_expires_at, planning_cost_usd, context"
)
# Step writes do not touch the run row (one statement per step); a run's
# updated_at is read as the later of its own and its last step's timestamp.
_SELECT_RUNS = (
    "SELECT run_id, user_id, session_id, message, principal, budget_usd, plan, status, detail, "
    "created_at, MAX(updated_at, COALESCE((SELECT ts FROM steps WHERE steps.run_id = runs.run_id "
    "ORDER BY seq DESC LIMIT 1), updated_at)), owner, epoch, lease_expires_at, planning_cost_usd, "
    "then_status, answer, context FROM runs"
)
_INSERT_STEP = (
    f"INSERT INTO steps (run_id, {', '.join(STEP_COLUMNS)}) "
    f"SELECT run_id, {', '.join('?' * len(STEP_COLUMNS))} FROM runs "
    "WHERE run_id = ? AND epoch = ? AND owner = ?"
)
_INSERT_STEP_ROW = (
    f"INSERT INTO steps (run_id, {', '.join(STEP_COLUMNS)}) VALUES ({', '.join('?' * (1 + len(STEP_COLUMNS)))})"
)
_SELECT_STEPS = f"SELECT {', '.join(STEP_COLUMNS)} FROM steps WHERE run_id = ? ORDER BY seq"
_INSERT_REVISION = (
    "INSERT INTO plan_revisions (run_id, revision, reason, plan, planning_cost_usd, ts) VALUES (?, ?, ?, ?, ?, ?)"
)
_SELECT_REVISIONS = (
    "SELECT revision, reason, plan, planning_cost_usd, ts FROM plan_revisions WHERE run_id = ? ORDER BY revision"
)
_APPROVAL_COLUMNS = (
    "run_id, step_id, tool_name, args, requested_by, requested_at, expires_at, status, decided_by, decided_at, reason"
)
_SELECT_APPROVAL = f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE run_id = ? AND step_id = ?"
# list_approvals: which stored rows have each status_at(now) (a pending one past its expiry reads expired)
_APPROVALS_WHERE = {
    None: "1",
    "pending": "status = 'pending' AND expires_at > :now",
    "expired": "status = 'expired' OR (status = 'pending' AND expires_at <= :now)",
    "approved": "status = 'approved'",
    "denied": "status = 'denied'",
}


class SQLiteJournal:
    """The journal in ``<home>/agentkeel.db`` (the file the other embedded stores share).

    ``clock`` gives the time used for timestamps and lease expiry (inject one in
    tests); ``synchronous`` is SQLite's ``PRAGMA synchronous`` for this
    connection (see the module docstring).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        synchronous: str = "NORMAL",
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        mode = str(synchronous).upper()
        if mode not in SYNCHRONOUS_MODES:
            raise ConfigError(
                f"journal synchronous mode must be one of {', '.join(SYNCHRONOUS_MODES)}, "
                f"got {synchronous!r}"
            )
        self.home = Path(home)
        self.path = db_path(self.home)
        self.synchronous = mode
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._db = ProcessConnection(
            self.home, "journal", busy_timeout_s=busy_timeout_s, closed_hint="; open a new SQLiteJournal",
            on_open=lambda conn: conn.execute(f"PRAGMA synchronous = {mode}"),
        )
        self._run = self._db.run

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
        plan_json = encode(plan, f"the plan of run {run_id!r}")
        context_json = "" if context is None else encode(context, f"the memory report of run {run_id!r}")
        budget = None if budget_usd is None else float(budget_usd)
        cost = float(planning_cost_usd)

        def write(conn: sqlite3.Connection) -> Lease:
            now = self._clock()
            lease = Lease(run_id, owner, 1, now + ttl_s)
            try:
                conn.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', '', ?, ?, ?, 1, ?, ?, ?)",
                    (
                        run_id,
                        user_id,
                        session_id,
                        message,
                        principal,
                        budget,
                        plan_json,
                        now,
                        now,
                        owner,
                        lease.expires_at,
                        cost,
                        context_json,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise RunExistsError(
                    f"run {run_id!r} is already in the journal; use a new run id, "
                    "or acquire the existing run to resume it",
                    run_id=run_id,
                ) from exc
            conn.execute(_INSERT_REVISION, (run_id, 1, "initial", plan_json, cost, now))
            return lease

        return self._run("create_run", lambda conn: atomic(conn, write))

    def revise_plan(self, lease: Lease, plan: dict[str, Any], reason: str, planning_cost_usd: float = 0.0) -> int:
        plan_json, reason, cost = check_revision(lease.run_id, plan, reason, planning_cost_usd)

        def write(conn: sqlite3.Connection) -> int:
            if self._holder(conn, lease.run_id) != (lease.epoch, lease.owner):
                raise self._refusal(conn, lease)
            now = self._clock()
            # A run journaled before revisions were stored: first store its revision 1 as load reads it.
            conn.execute(
                "INSERT INTO plan_revisions (run_id, revision, reason, plan, planning_cost_usd, ts) "
                "SELECT run_id, 1, 'initial', plan, planning_cost_usd, created_at FROM runs WHERE run_id = ? "
                "AND NOT EXISTS (SELECT 1 FROM plan_revisions WHERE run_id = ?)",
                (lease.run_id, lease.run_id),
            )
            (latest,) = conn.execute(
                "SELECT MAX(revision) FROM plan_revisions WHERE run_id = ?", (lease.run_id,)
            ).fetchone()
            revision = int(latest) + 1
            conn.execute(_INSERT_REVISION, (lease.run_id, revision, reason, plan_json, cost, now))
            conn.execute(
                "UPDATE runs SET plan = ?, planning_cost_usd = planning_cost_usd + ?, then_status = '', "
                "updated_at = ? WHERE run_id = ?",
                (plan_json, cost, now, lease.run_id),
            )
            return revision

        return self._run("revise_plan", lambda conn: atomic(conn, write))

    def acquire(self, run_id: str, owner: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        def take(conn: sqlite3.Connection) -> Lease:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT owner, epoch, lease_expires_at FROM runs WHERE run_id = ?", (run_id,)
                ).fetchone()
                if row is None:
                    raise not_found(run_id)
                holder, epoch, expires_at = row
                now = self._clock()
                check_takeover(run_id, holder, expires_at, owner, now)
                lease = Lease(run_id, owner, epoch + 1, now + ttl_s)
                conn.execute(
                    "UPDATE runs SET owner = ?, epoch = ?, lease_expires_at = ?, updated_at = ? "
                    "WHERE run_id = ?",
                    (owner, lease.epoch, lease.expires_at, now, run_id),
                )
                conn.execute("COMMIT")
                return lease
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        return self._run("acquire", take)

    def renew(self, lease: Lease, ttl_s: float = DEFAULT_TTL_S) -> Lease:
        def write(conn: sqlite3.Connection) -> Lease:
            now = self._clock()
            renewed = Lease(lease.run_id, lease.owner, lease.epoch, now + ttl_s)
            cur = conn.execute(
                "UPDATE runs SET lease_expires_at = ? WHERE run_id = ? AND epoch = ? AND owner = ?",
                (renewed.expires_at, lease.run_id, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                raise self._refusal(conn, lease)
            return renewed

        return self._run("renew", write)

    def release(self, lease: Lease) -> None:
        def write(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE runs SET owner = '', lease_expires_at = 0, updated_at = ? "
                "WHERE run_id = ? AND epoch = ? AND owner = ?",
                (self._clock(), lease.run_id, lease.epoch, lease.owner),
            )
            if cur.rowcount != 1:
                row = self._holder(conn, lease.run_id)
                if row is not None and row == (lease.epoch, ""):
                    return  # already released under this lease
                raise self._refusal(conn, lease)

        self._run("release", write)

    def set_status(
        self, lease: Lease, status: str, detail: str = "", then_status: str = "", answer: str | None = None
    ) -> None:
        status = getattr(status, "value", status)
        then_status = getattr(then_status, "value", then_status)
        new_answer = None if answer is None else str(answer)

        def write(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE runs SET status = ?, detail = ?, then_status = ?, answer = COALESCE(?, answer), "
                "updated_at = ? WHERE run_id = ? AND epoch = ? AND owner = ?",
                (
                    status,
                    detail,
                    then_status,
                    new_answer,
                    self._clock(),
                    lease.run_id,
                    lease.epoch,
                    lease.owner,
                ),
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
        check_records(records)
        if len(records) == 1:
            self._append(lease, records[0])
            return
        now = self._clock()
        rows = [(lease.run_id, *encode_step(record, now)) for record in records]

        def write(conn: sqlite3.Connection) -> None:
            # Inside BEGIN IMMEDIATE the write lock is held from the fence check to the commit,
            # so one check covers every row.
            if self._holder(conn, lease.run_id) != (lease.epoch, lease.owner):
                raise self._refusal(conn, lease)
            conn.executemany(_INSERT_STEP_ROW, rows)

        if rows:
            self._run(f"writing steps {', '.join(str(r.step_id) for r in records)}",
                      lambda conn: atomic(conn, write))

    def _append(self, lease: Lease, record: StepRecord) -> None:
        fence = (lease.run_id, lease.epoch, lease.owner)

        def write(conn: sqlite3.Connection) -> None:
            # One statement, committed on return: the fence check and the insert are atomic.
            if conn.execute(_INSERT_STEP, encode_step(record, self._clock()) + fence).rowcount != 1:
                raise self._refusal(conn, lease)

        self._run(f"writing step {record.step_id}", write)

    # --- approvals ---------------------------------------------------------------------

    def request_approval(
        self, lease: Lease, step_id: int, tool_name: str, args: Mapping[str, Any], requested_by: str, ttl_s: float
    ) -> ApprovalRecord:
        step_id = int(step_id)
        args_json, ttl = check_approval_request(lease, step_id, args, ttl_s)

        def write(conn: sqlite3.Connection) -> ApprovalRecord:
            if self._holder(conn, lease.run_id) != (lease.epoch, lease.owner):
                raise self._refusal(conn, lease)
            row = conn.execute(_SELECT_APPROVAL, (lease.run_id, step_id)).fetchone()
            if row is not None:
                return approval_from_row(row)  # requested before: unchanged, nothing written
            now = self._clock()
            conn.execute(
                "INSERT INTO approvals (run_id, step_id, tool_name, args, requested_by, requested_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (lease.run_id, step_id, tool_name, args_json, requested_by, now, now + ttl),
            )
            return approval_from_row(conn.execute(_SELECT_APPROVAL, (lease.run_id, step_id)).fetchone())

        return self._run("request_approval", lambda conn: atomic(conn, write))

    def approval(self, run_id: str, step_id: int) -> ApprovalRecord | None:
        def read(conn: sqlite3.Connection) -> ApprovalRecord | None:
            row = conn.execute(_SELECT_APPROVAL, (run_id, int(step_id))).fetchone()
            return None if row is None else approval_from_row(row)

        return self._run("approval", read)

    def decide_approval(
        self, run_id: str, step_id: int, *, approved: bool, by: str, reason: str = ""
    ) -> ApprovalRecord:
        step_id = int(step_id)
        check_decider(run_id, step_id, by)
        decision = "approved" if approved else "denied"

        def write(conn: sqlite3.Connection) -> ApprovalRecord:
            now = self._clock()
            # One conditional statement decides: of two deciders, the second finds it no longer pending.
            cur = conn.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, reason = ? "
                "WHERE run_id = ? AND step_id = ? AND status = 'pending' AND expires_at > ?",
                (decision, by, now, str(reason), run_id, step_id, now),
            )
            decided = cur.rowcount == 1
            if not decided:
                conn.execute(
                    "UPDATE approvals SET status = 'expired' "
                    "WHERE run_id = ? AND step_id = ? AND status = 'pending' AND expires_at <= ?",
                    (run_id, step_id, now),
                )
            row = conn.execute(_SELECT_APPROVAL, (run_id, step_id)).fetchone()
            conn.execute("COMMIT")  # the expiry is kept though the call raises
            if row is None:
                raise no_approval(run_id, step_id)
            record = approval_from_row(row)
            if not decided:
                raise approval_refusal(record, now)
            return record

        return self._run("decide_approval", lambda conn: atomic(conn, write))

    def list_approvals(self, status: str | None = "pending", limit: int = 50) -> list[ApprovalRecord]:
        status = check_listed_status(status)
        where = _APPROVALS_WHERE[status]
        count = max(0, int(limit))

        def read(conn: sqlite3.Connection) -> list[ApprovalRecord]:
            rows = conn.execute(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE {where} "
                "ORDER BY requested_at DESC, rowid DESC LIMIT :limit",
                {"now": self._clock(), "limit": count},
            ).fetchall()
            return [approval_from_row(row) for row in rows]

        return self._run("list_approvals", read)

    # --- reads --------------------------------------------------------------------------

    def load(self, run_id: str) -> RunState:
        def read(conn: sqlite3.Connection) -> RunState:
            conn.execute("BEGIN")  # one snapshot for the run, its steps and its revisions
            try:
                row = conn.execute(f"{_SELECT_RUNS} WHERE run_id = ?", (run_id,)).fetchone()
                if row is None:
                    raise not_found(run_id)
                steps = conn.execute(_SELECT_STEPS, (run_id,)).fetchall()
                revisions = conn.execute(_SELECT_REVISIONS, (run_id,)).fetchall()
            finally:
                conn.execute("COMMIT")
            run = run_from_row(row)
            plans = tuple(PlanRecord(n, why, decode(plan), cost, ts) for n, why, plan, cost, ts in revisions)
            if not plans:  # journaled before revisions were stored: its plan is its revision 1
                plans = (PlanRecord(1, "initial", run.plan, run.planning_cost_usd, run.created_at),)
            return RunState(run, tuple(decode_step(s) for s in steps), plans)

        return self._run("load", read)

    def list_runs(self, limit: int = 50, *, user_id: str | None = None) -> list[RunRecord]:
        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            if user_id is None:
                rows = conn.execute(
                    f"{_SELECT_RUNS} ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (max(0, int(limit)),),
                ).fetchall()
            else:
                rows = conn.execute(
                    f"{_SELECT_RUNS} WHERE user_id = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                    (user_id, max(0, int(limit))),
                ).fetchall()
            return [run_from_row(row) for row in rows]

        return self._run("list_runs", read)

    def abandoned_runs(self, now: float, limit: int = 100) -> list[RunRecord]:
        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            rows = conn.execute(
                f"{_SELECT_RUNS} WHERE status IN ('running', 'rolling_back') "
                "AND (owner = '' OR lease_expires_at <= ?) ORDER BY created_at, rowid LIMIT ?",
                (float(now), max(0, int(limit))),
            ).fetchall()
            return [run_from_row(row) for row in rows]

        return self._run("abandoned_runs", read)

    def close(self) -> None:
        self._db.close()

    # --- helpers --------------------------------------------------------------------

    @staticmethod
    def _holder(conn: sqlite3.Connection, run_id: str) -> tuple[int, str] | None:
        row = conn.execute("SELECT epoch, owner FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else (row[0], row[1])

    def _refusal(self, conn: sqlite3.Connection, lease: Lease) -> Exception:
        row = self._holder(conn, lease.run_id)
        if row is None:
            return not_found(lease.run_id)
        return fenced(lease, row[0], row[1])

    def __repr__(self) -> str:
        return f"SQLiteJournal({str(self.home)!r}, synchronous={self.synchronous!r})"
