"""The shared ``BudgetStore``: tables ``ledger`` and ``budget_reservations`` in ``<home>/agentkeel.db``.

Promises, on top of the ``agentkeel.cost.store.BudgetStore`` protocol (the same
semantics as ``MemoryBudgetStore``, checked by ``tests/cost/conformance.py``):

- Safe across threads and processes. ``reserve`` runs inside ``BEGIN IMMEDIATE``:
  SQLite's write lock is taken before anything is read, so deleting the expired
  reservations, summing every scope (settled rows plus unexpired reservations),
  and inserting the reservation are one transaction that no other connection, in
  any process, can interleave with. Two processes cannot both pass the check.
- ``settle`` is one transaction: the reservation is deleted and the row inserted
  with its ``reservation_id`` (``UNIQUE``; ``INSERT OR IGNORE``), so settling the
  same id twice, from anywhere, writes one row.
- Each call has committed when it returns (WAL, ``synchronous = NORMAL``, as set
  by ``agentkeel.stores.open_db``: a commit survives the process being killed; the
  last ones before a power loss may be lost).
- Busy waits follow ``busy_timeout_s``; a database still locked after that, or one
  that cannot be read, raises ``StoreError`` naming the file.
- One connection per store per process, used under a lock; after a fork the child
  opens its own on first use (it never touches its parent's).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agentkeel.cost.store import (
    LedgerEntry,
    ScopeLimit,
    by_cost,
    check_amount,
    check_bound,
    check_count,
    check_entry,
    check_group,
    check_run_ids,
    check_scope,
    check_scopes,
    check_text,
    check_ttl,
    check_user_filter,
    fits,
    left_of,
    new_reservation_id,
    refusal,
    settle_notes,
    totals_row,
)
from agentkeel.stores import DEFAULT_BUSY_TIMEOUT_S, ProcessConnection, atomic, db_path

__all__ = ["SQLiteBudgetStore"]

_T = TypeVar("_T")

_CHUNK = 500

_LEDGER_COLUMNS = (
    "ts, run_id, step_id, user_id, session_id, principal, kind, purpose, reason, model, tier, tool, "
    "input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, estimated"
)
_INSERT_ROW = (
    f"INSERT OR IGNORE INTO ledger ({_LEDGER_COLUMNS}, reservation_id) VALUES ({', '.join('?' * 19)})"
)
_OWNER_WHERE = {
    "session": "user_id = :user_id AND session_id = :session_id",
    "user_day": "user_id = :user_id",
    "principal_month": "principal = :principal",
}
# What a scope holds now: its settled rows in the window, and the unexpired reservations made in it.
_USED = {
    kind: (
        f"SELECT (SELECT COALESCE(SUM(cost_usd), 0.0) FROM ledger WHERE {where} AND ts >= :start AND ts < :end), "
        f"(SELECT COALESCE(SUM(amount_usd), 0.0) FROM budget_reservations WHERE {where} "
        "AND created_at >= :start AND created_at < :end AND expires_at > :now)"
    )
    for kind, where in _OWNER_WHERE.items()
}
# totals(by=...): the key of a row; "day" is the UTC date of the whole second of ts (ts >= 0).
_GROUP_KEY = {
    "tier": "COALESCE(tier, '(none)')",
    "model": "COALESCE(model, '(none)')",
    "tool": "COALESCE(tool, '(none)')",
    "user": "user_id",
    "session": "user_id || '/' || session_id",
    "day": "strftime('%Y-%m-%d', CAST(ts AS INTEGER), 'unixepoch')",
    "reason": "reason",
    "kind": "kind",
    "run": "run_id",
    "principal": "principal",
}


class SQLiteBudgetStore:
    """The budget store in ``<home>/agentkeel.db`` (the file the other embedded stores share).

    ``clock`` gives the time of reservations, their expiry and the rows stamped on
    write (inject one in tests; every process sharing the file should use the real one).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> None:
        self.home = Path(home)
        self.path = db_path(self.home)
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._db = ProcessConnection(self.home, "budget store", busy_timeout_s=busy_timeout_s,
                                     closed_hint="; open a new SQLiteBudgetStore")
        self._run = self._db.run

    # --- reservations -------------------------------------------------------------------

    def reserve(self, scopes: Sequence[ScopeLimit], amount_usd: float, *, holder: str, ttl_s: float) -> str:
        amount = check_amount(amount_usd, "amount_usd")
        ttl = check_ttl(ttl_s)
        checked, owner = check_scopes(scopes)
        check_text(holder, "holder")
        reservation_id = new_reservation_id()

        def hold(conn: sqlite3.Connection) -> str:
            now = self._clock()
            conn.execute("DELETE FROM budget_reservations WHERE expires_at <= ?", (now,))
            for scope in checked:
                used = _used(conn, scope, now)
                if not fits(used, amount, scope.limit_usd):
                    raise refusal(scope, amount, used)  # rolled back: nothing held
            conn.execute(
                "INSERT INTO budget_reservations "
                "(id, user_id, session_id, principal, amount_usd, created_at, expires_at, holder) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (reservation_id, *owner, amount, now, now + ttl, holder),
            )
            return reservation_id

        return self._run("reserve", lambda conn: atomic(conn, hold))

    def settle(self, reservation_id: str, entry: LedgerEntry) -> None:
        check_text(reservation_id, "reservation_id")
        check_entry(entry, 1.0)  # refuse a bad entry before taking the lock (stamped for real below)

        def write(conn: sqlite3.Connection) -> tuple[float, bool, Any, float]:
            now = self._clock()
            row = check_entry(entry, now)
            duplicate = conn.execute(_INSERT_ROW, (*_row_values(row), reservation_id)).rowcount == 0
            held = conn.execute(
                "SELECT expires_at, amount_usd FROM budget_reservations WHERE id = ?", (reservation_id,)
            ).fetchone()
            conn.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation_id,))
            return now, duplicate, held, row.cost_usd

        now, duplicate, held, cost = self._run("settle", lambda conn: atomic(conn, write))
        settle_notes(reservation_id, duplicate=duplicate, expires_at=None if held is None else held[0],
                     amount=None if held is None else held[1], now=now, cost=cost)

    def release(self, reservation_id: str) -> None:
        check_text(reservation_id, "reservation_id")
        self._run(
            "release",
            lambda conn: conn.execute("DELETE FROM budget_reservations WHERE id = ?", (reservation_id,)),
        )

    def record(self, entry: LedgerEntry) -> None:
        check_entry(entry, 1.0)

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(_INSERT_ROW, (*_row_values(check_entry(entry, self._clock())), None))

        self._run("record", write)

    def left(self, scope: ScopeLimit) -> float:
        check_scope(scope)
        return self._run("left", lambda conn: left_of(scope, _used(conn, scope, self._clock())))

    # --- reports ------------------------------------------------------------------------

    def entries(self, *, run_id: str | None = None, user_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        where, params = _filters(user_id, since, until)
        if run_id is not None:
            where += " AND run_id = :run_id"
            params["run_id"] = check_text(run_id, "run_id")
        params["limit"] = -1 if limit is None else check_count(limit, "limit")
        sql = f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE {where} ORDER BY ts, id LIMIT :limit"
        rows = self._run("entries", lambda conn: conn.execute(sql, params).fetchall())
        return [_entry(row) for row in rows]

    def totals(self, by: str, *, user_id: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        key = _GROUP_KEY[check_group(by)]
        where, params = _filters(user_id, since, until)
        sql = (
            f"SELECT {key} AS k, SUM(cost_usd), COUNT(*), SUM(input_tokens), SUM(output_tokens), "
            f"SUM(CASE WHEN estimated THEN cost_usd ELSE 0.0 END) FROM ledger WHERE {where} GROUP BY k"
        )
        rows = self._run(f"totals by {by}", lambda conn: conn.execute(sql, params).fetchall())
        return by_cost((totals_row(*row) for row in rows), "key")

    def top_runs(self, n: int, *, user_id: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[dict[str, Any]]:
        count = check_count(n, "n")
        where, params = _filters(user_id, since, until)
        sql = (
            "SELECT run_id, MIN(user_id), MIN(session_id), SUM(cost_usd), COUNT(*) FROM ledger "
            f"WHERE {where} GROUP BY run_id"
        )
        rows = self._run("top_runs", lambda conn: conn.execute(sql, params).fetchall())
        runs = (
            {"run_id": run_id, "user_id": user, "session_id": session, "cost_usd": float(cost), "calls": int(calls)}
            for run_id, user, session, cost, calls in rows
        )
        return by_cost(runs, "run_id")[:count]

    def run_costs(self, run_ids: Sequence[str]) -> dict[str, float]:
        wanted = sorted(set(check_run_ids(run_ids)))

        def read(conn: sqlite3.Connection) -> dict[str, float]:
            costs: dict[str, float] = {}
            for i in range(0, len(wanted), _CHUNK):  # a bounded number of SQL variables per statement
                chunk = wanted[i:i + _CHUNK]
                costs.update(conn.execute(
                    f"SELECT run_id, SUM(cost_usd) FROM ledger WHERE run_id IN ({', '.join('?' * len(chunk))}) "
                    "GROUP BY run_id",
                    chunk,
                ).fetchall())
            return costs

        return self._run("run_costs", read)

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteBudgetStore({str(self.home)!r})"


def _used(conn: sqlite3.Connection, scope: ScopeLimit, now: float) -> float:
    settled, held = conn.execute(
        _USED[scope.kind],
        {
            "user_id": scope.user_id,
            "session_id": scope.session_id,
            "principal": scope.principal,
            "start": float(scope.start),
            "end": float(scope.end),
            "now": now,
        },
    ).fetchone()
    return float(settled) + float(held)


def _filters(user_id: object, since: object, until: object) -> tuple[str, dict[str, Any]]:
    where: list[str] = ["1"]
    params: dict[str, Any] = {}
    user = check_user_filter(user_id)
    low = check_bound(since, "since")
    high = check_bound(until, "until")
    if user is not None:
        where.append("user_id = :user_id")
        params["user_id"] = user
    if low is not None:
        where.append("ts >= :since")
        params["since"] = low
    if high is not None:
        where.append("ts < :until")
        params["until"] = high
    return " AND ".join(where), params


def _row_values(row: LedgerEntry) -> tuple[Any, ...]:
    return (
        row.ts, row.run_id, row.step_id, row.user_id, row.session_id, row.principal, row.kind, row.purpose,
        row.reason, row.model, row.tier, row.tool, row.input_tokens, row.output_tokens, row.cached_tokens,
        row.reasoning_tokens, row.cost_usd, int(row.estimated),
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    (ts, run_id, step_id, user_id, session_id, principal, kind, purpose, reason, model, tier, tool,
     input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, estimated) = row
    return LedgerEntry(
        run_id=run_id, user_id=user_id, session_id=session_id, principal=principal, kind=kind,
        cost_usd=float(cost_usd), purpose=purpose, reason=reason, step_id=step_id, model=model, tier=tier,
        tool=tool, input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=cached_tokens,
        reasoning_tokens=reasoning_tokens, estimated=bool(estimated), ts=float(ts),
    )
