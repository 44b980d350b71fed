"""The shared ``BudgetStore`` on PostgreSQL: tables ``ledger`` and ``budget_reservations``
(``agentkeel.pg_schema.ledger``), selected by ``[store] url``, so every replica of the
service spends from the same budgets.

Promises, on top of the ``agentkeel.cost.store.BudgetStore`` protocol (the semantics of
``SQLiteBudgetStore`` and ``MemoryBudgetStore``, checked by ``tests/cost/conformance.py``):

- **Reservations are atomic across threads, processes and hosts.** SQLite gets this from
  its one write lock; here ``reserve`` takes transaction-level advisory locks
  (``pg_advisory_xact_lock(hashtextextended(key, 0))``), one per *scope key*, before it
  reads anything. A scope key names the owner a scope counts (``session`` of user and
  session, ``user_day`` of a user, ``principal_month`` of a principal; the window is
  left out, so overlapping windows of one owner share the key). A reservation owned by
  ``(user, session, principal)`` counts towards exactly the scopes of its three keys;
  it takes each of those three locks: *exclusive* when it checks a scope of that key,
  *shared* otherwise (it only adds to it). Then, in one statement (one snapshot), it
  sums every scope it checks (settled rows in the window plus the unexpired
  reservations made in it), refuses or inserts its reservation, and commits, which
  releases the locks.

  Why two replicas cannot both pass a check and overspend: let R check scope S (key
  k). Every reservation R' that counts towards S is owned by S's owner, so R' holds k
  at least shared from before its check until its commit, and R holds k exclusively:
  R and R' cannot overlap. Either R' committed before R got the lock (PostgreSQL makes
  a commit visible before it releases the transaction's locks, and R's sum, under READ
  COMMITTED, takes its snapshot after the lock is granted, so R sees R'), or R' waits
  for R's commit and, if it checks S too, sees R. So for every scope, the reservations
  that checked it are checked one after the other against everything held before
  them: the same as SQLite's serial order. Shared locks let reservations that only add
  to a key (two sessions of one user each checking only its session scope) run at
  once; neither's check reads what the other writes. Locks are taken in the order of
  their lock ids (the hashes, not the keys: two keys with one hash are one lock), so
  two reservations cannot deadlock, and a holder waits for nothing but other locks
  taken in that order. A hash collision only serialises two unrelated owners.

  ``settle``, ``release`` and ``record`` take no advisory lock: each is one transaction
  that commits as a whole, and the sum a reservation checks is one statement, so it
  sees a settlement (reservation removed, row written) entirely or not at all. A
  settlement costing at most its reservation, a release and an expiry only lower what
  a scope holds, so a check made just before them stays true; ``record`` writes money
  spent without a reservation (unchecked by design, as in SQLite). A zero amount
  always fits and adds nothing, so it is held without locks.
- ``reserve`` runs ``SET TRANSACTION ISOLATION LEVEL READ COMMITTED`` first (whatever
  the server's default), since the argument above needs a fresh snapshot per statement.
- Expired reservations hold no money (every sum asks ``expires_at > now``) and leave no
  row. ``reserve`` also deletes expired ones (``FOR UPDATE SKIP LOCKED``, at most
  ``GC_BATCH`` a call, so two replicas cleaning up never wait for each other).
- ``settle`` is one transaction: the row is inserted with its ``reservation_id``
  (``UNIQUE``; ``ON CONFLICT DO NOTHING``) and the reservation deleted, so settling one
  id twice, from anywhere, at once or not, writes one row.
- ``totals(by="day")`` groups by the UTC date of the whole second of ``ts``, as SQLite's
  ``strftime('%Y-%m-%d', CAST(ts AS INTEGER), 'unixepoch')``; ``top_runs`` takes the
  smallest user and session of a run in code-point order (``COLLATE "C"``), as SQLite
  and Python compare strings. Sums are PostgreSQL's ``SUM`` of 8-byte floats (within
  ``EPSILON`` of the other backends' sums).
- Time is the store's ``clock`` (default ``time.time``), as in SQLite: replicas sharing
  the database must have synchronised clocks (NTP); each replica judges expiry by its own.
- PostgreSQL text cannot hold NUL characters (nor lone surrogates): a reservation, a
  settlement or a row naming such a string is refused (``ValueError`` naming the field,
  nothing written); a filter or a ``left`` scope with one matches nothing (as it could
  match nothing stored). A ``step_id`` outside 64-bit integers is refused likewise.
- A server that cannot be reached raises ``StoreError`` naming it (never its password).
  Opening connects (and migrates the schema on first use in the process).
- ``close`` closes this handle only: the pool is the process's, shared by every store
  on the URL (``agentkeel.pg.database``); after a fork the child opens its own pool.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import agentkeel.pg as pg
from agentkeel.cost.store import (
    SCOPE_KINDS,
    LedgerEntry,
    ScopeLimit,
    ScopeOwner,
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
from agentkeel.errors import StoreError

if TYPE_CHECKING:
    import psycopg

__all__ = ["GC_BATCH", "PostgresBudgetStore", "scope_key"]

_T = TypeVar("_T")

GC_BATCH = 1000
"""The most expired reservations one ``reserve`` deletes."""

_INT64 = (-(2**63), 2**63 - 1)
_LOCK_PREFIX = "agentkeel.budget:"
_TEXT_FIELDS = ("run_id", "user_id", "session_id", "principal", "kind", "purpose", "reason")
_OPTIONAL_TEXT_FIELDS = ("model", "tier", "tool")

_LEDGER_COLUMNS = (
    "ts, run_id, step_id, user_id, session_id, principal, kind, purpose, reason, model, tier, tool, "
    "input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, estimated"
)
_INSERT_ROW = (
    f"INSERT INTO ledger ({_LEDGER_COLUMNS}, reservation_id) VALUES ({', '.join(['%s'] * 19)}) "
    "ON CONFLICT (reservation_id) DO NOTHING"
)
_OWNER_WHERE = {
    "session": "user_id = %s AND session_id = %s",
    "user_day": "user_id = %s",
    "principal_month": "principal = %s",
}
# What a scope holds now: its settled rows in the window, and the unexpired reservations made in it.
_USED = {
    kind: (
        f"(SELECT COALESCE(SUM(cost_usd), 0) FROM ledger WHERE {where} AND ts >= %s AND ts < %s), "
        f"(SELECT COALESCE(SUM(amount_usd), 0) FROM budget_reservations WHERE {where} "
        "AND created_at >= %s AND created_at < %s AND expires_at > %s)"
    )
    for kind, where in _OWNER_WHERE.items()
}
_GC = (
    "DELETE FROM budget_reservations WHERE id IN (SELECT id FROM budget_reservations WHERE expires_at <= %s "
    f"ORDER BY expires_at LIMIT {GC_BATCH} FOR UPDATE SKIP LOCKED)"
)
# totals(by=...): the key of a row; "day" is the UTC date of the whole second of ts (ts >= 0).
_GROUP_KEY = {
    "tier": "COALESCE(tier, '(none)')",
    "model": "COALESCE(model, '(none)')",
    "tool": "COALESCE(tool, '(none)')",
    "user": "user_id",
    "session": "user_id || '/' || session_id",
    "day": "to_char(to_timestamp(trunc(ts)) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "reason": "reason",
    "kind": "kind",
    "run": "run_id",
    "principal": "principal",
}


def scope_key(kind: str, user_id: str, session_id: str, principal: str) -> str:
    """The advisory lock key of the scopes of ``kind`` that an owner's spending counts towards."""
    if kind == "session":
        parts = [kind, user_id, session_id]
    elif kind == "user_day":
        parts = [kind, user_id]
    else:
        parts = [kind, principal]
    return _LOCK_PREFIX + json.dumps(parts)  # ASCII, unambiguous, storable whatever the names hold


class PostgresBudgetStore:
    """The budget store in the PostgreSQL database at ``url`` (migrated on first use).

    ``clock`` gives the time of reservations, their expiry and the rows stamped on
    write (inject one in tests; every replica sharing the database should use the real
    one). Opening connects, so an unreachable server fails here.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.label = pg.redact(url)
        self._clock = clock
        self._closed = False
        self._lock = threading.Lock()
        self._run("open", lambda conn: None)

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError(f"the budget store at {self.label} is closed; open a new PostgresBudgetStore")
        return pg.database(self.url).run(what, fn)

    # --- reservations -------------------------------------------------------------------

    def reserve(self, scopes: Sequence[ScopeLimit], amount_usd: float, *, holder: str, ttl_s: float) -> str:
        amount = check_amount(amount_usd, "amount_usd")
        ttl = check_ttl(ttl_s)
        checked, owner = check_scopes(scopes)
        check_text(holder, "holder")
        for field, value in (*zip(ScopeOwner._fields, owner, strict=True), ("holder", holder)):
            _require_storable(value, field)
        reservation_id = new_reservation_id()
        locks: dict[str, bool] = {}  # scope key -> exclusive (checked) or shared (only added to)
        if amount > 0:
            for kind in SCOPE_KINDS:
                locks[scope_key(kind, *owner)] = False
            for scope in checked:
                locks[scope_key(scope.kind, scope.user_id, scope.session_id, scope.principal)] = True

        def hold(conn: psycopg.Connection[Any]) -> str:
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            _take_locks(conn, locks)
            now = float(self._clock())
            conn.execute(_GC, (now,))
            if amount > 0 and checked:
                for scope, used in zip(checked, _used(conn, checked, now), strict=True):
                    if not fits(used, amount, scope.limit_usd):
                        raise refusal(scope, amount, used)  # rolled back: nothing held
            conn.execute(
                "INSERT INTO budget_reservations "
                "(id, user_id, session_id, principal, amount_usd, created_at, expires_at, holder) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (reservation_id, *owner, amount, now, now + ttl, holder),
            )
            return reservation_id

        return self._run("reserve", hold)

    def settle(self, reservation_id: str, entry: LedgerEntry) -> None:
        check_text(reservation_id, "reservation_id")
        _require_storable(reservation_id, "reservation_id")
        _check_row(check_entry(entry, 1.0))  # refuse a bad entry before the transaction (stamped for real below)

        def write(conn: psycopg.Connection[Any]) -> tuple[float, bool, Any, float]:
            now = float(self._clock())
            row = check_entry(entry, now)
            duplicate = conn.execute(_INSERT_ROW, (*_row_values(row), reservation_id)).rowcount == 0
            held = conn.execute(
                "DELETE FROM budget_reservations WHERE id = %s RETURNING expires_at, amount_usd", (reservation_id,)
            ).fetchone()
            return now, duplicate, held, row.cost_usd

        now, duplicate, held, cost = self._run("settle", write)
        settle_notes(reservation_id, duplicate=duplicate, expires_at=None if held is None else float(held[0]),
                     amount=None if held is None else float(held[1]), now=now, cost=cost)

    def release(self, reservation_id: str) -> None:
        check_text(reservation_id, "reservation_id")

        def delete(conn: psycopg.Connection[Any]) -> None:
            if _storable(reservation_id):  # an id PostgreSQL cannot hold was never made: nothing to remove
                conn.execute("DELETE FROM budget_reservations WHERE id = %s", (reservation_id,))

        self._run("release", delete)

    def record(self, entry: LedgerEntry) -> None:
        _check_row(check_entry(entry, 1.0))

        def write(conn: psycopg.Connection[Any]) -> None:
            conn.execute(_INSERT_ROW, (*_row_values(check_entry(entry, float(self._clock()))), None))

        self._run("record", write)

    def left(self, scope: ScopeLimit) -> float:
        check_scope(scope)

        def read(conn: psycopg.Connection[Any]) -> float:
            if not all(_storable(getattr(scope, field)) for field in ScopeOwner._fields):
                return left_of(scope, 0.0)  # an owner no row or reservation can have
            [used] = _used(conn, [scope], float(self._clock()))
            return left_of(scope, used)

        return self._run("left", read)

    # --- reports ------------------------------------------------------------------------

    def entries(self, *, run_id: str | None = None, user_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        where, params = _filters(user_id, since, until)
        if run_id is not None:
            where.append("run_id = %s")
            params.append(check_text(run_id, "run_id"))
        count = None if limit is None else check_count(limit, "limit")
        if not all(_storable(p) for p in params if isinstance(p, str)):
            return []
        sql = f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE {' AND '.join(where)} ORDER BY ts, id LIMIT %s"
        rows = self._run("entries", lambda conn: conn.execute(sql, (*params, count)).fetchall())
        return [_entry(row) for row in rows]

    def totals(self, by: str, *, user_id: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        key = _GROUP_KEY[check_group(by)]
        where, params = _filters(user_id, since, until)
        if not all(_storable(p) for p in params if isinstance(p, str)):
            return []
        sql = (
            f"SELECT {key} AS k, SUM(cost_usd), COUNT(*), SUM(input_tokens), SUM(output_tokens), "
            "SUM(CASE WHEN estimated THEN cost_usd ELSE 0::double precision END) "
            f"FROM ledger WHERE {' AND '.join(where)} GROUP BY k"
        )
        rows = self._run(f"totals by {by}", lambda conn: conn.execute(sql, params).fetchall())
        return by_cost((totals_row(*row) for row in rows), "key")

    def top_runs(self, n: int, *, user_id: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[dict[str, Any]]:
        count = check_count(n, "n")
        where, params = _filters(user_id, since, until)
        if not all(_storable(p) for p in params if isinstance(p, str)):
            return []
        sql = (
            'SELECT run_id, MIN(user_id COLLATE "C"), MIN(session_id COLLATE "C"), SUM(cost_usd), COUNT(*) '
            f"FROM ledger WHERE {' AND '.join(where)} GROUP BY run_id"
        )
        rows = self._run("top_runs", lambda conn: conn.execute(sql, params).fetchall())
        runs = (
            {"run_id": run_id, "user_id": user, "session_id": session, "cost_usd": float(cost), "calls": int(calls)}
            for run_id, user, session, cost, calls in rows
        )
        return by_cost(runs, "run_id")[:count]

    def run_costs(self, run_ids: Sequence[str]) -> dict[str, float]:
        wanted = sorted({run_id for run_id in check_run_ids(run_ids) if _storable(run_id)})
        if not wanted:
            return {}

        def read(conn: psycopg.Connection[Any]) -> dict[str, float]:
            rows = conn.execute(
                "SELECT run_id, SUM(cost_usd) FROM ledger WHERE run_id = ANY(%s) GROUP BY run_id", (wanted,)
            ).fetchall()
            return {str(run_id): float(cost) for run_id, cost in rows}

        return self._run("run_costs", read)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"PostgresBudgetStore({self.label!r})"


# --- helpers ----------------------------------------------------------------------------------


def _take_locks(conn: psycopg.Connection[Any], locks: dict[str, bool]) -> None:
    """The advisory locks of ``locks`` (key -> exclusive), in the order of their lock ids."""
    if not locks:
        return
    keys = sorted(locks)
    rows = conn.execute("SELECT k, hashtextextended(k, 0) FROM unnest(%s::text[]) AS k", (keys,)).fetchall()
    exclusive: dict[int, bool] = {}
    for key, lock_id in rows:  # keys of one hash are one lock, exclusive if any of them is
        exclusive[int(lock_id)] = exclusive.get(int(lock_id), False) or locks[str(key)]
    for lock_id in sorted(exclusive):
        if exclusive[lock_id]:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
        else:
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (lock_id,))


def _used(conn: psycopg.Connection[Any], scopes: Sequence[ScopeLimit], now: float) -> list[float]:
    """What each of ``scopes`` holds now (settled plus held), read in one statement: one snapshot."""
    parts: list[str] = []
    params: list[Any] = []
    for scope in scopes:
        if scope.kind == "session":
            owner: list[Any] = [scope.user_id, scope.session_id]
        elif scope.kind == "user_day":
            owner = [scope.user_id]
        else:
            owner = [scope.principal]
        start, end = float(scope.start), float(scope.end)
        parts.append(_USED[scope.kind])
        params.extend([*owner, start, end, *owner, start, end, now])
    row = conn.execute(f"SELECT {', '.join(parts)}", params).fetchone()
    assert row is not None
    return [float(row[i]) + float(row[i + 1]) for i in range(0, len(row), 2)]


def _filters(user_id: object, since: object, until: object) -> tuple[list[str], list[Any]]:
    where: list[str] = ["true"]
    params: list[Any] = []
    user = check_user_filter(user_id)
    low = check_bound(since, "since")
    high = check_bound(until, "until")
    if user is not None:
        where.append("user_id = %s")
        params.append(user)
    if low is not None:
        where.append("ts >= %s")
        params.append(float(low))
    if high is not None:
        where.append("ts < %s")
        params.append(float(high))
    return where, params


def _storable(text: str) -> bool:
    """Whether PostgreSQL text can hold ``text`` (UTF-8, no NUL)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _require_storable(text: str, field: str) -> None:
    if not _storable(text):
        raise ValueError(f"{field} must not hold a NUL character or a lone surrogate (PostgreSQL text cannot)")


def _check_row(row: LedgerEntry) -> None:
    """ValueError naming the field of ``row`` (already ``check_entry``-ed) that PostgreSQL cannot hold."""
    for field in _TEXT_FIELDS:
        _require_storable(getattr(row, field), f"{field} of a ledger entry")
    for field in _OPTIONAL_TEXT_FIELDS:
        value = getattr(row, field)
        if value is not None:
            _require_storable(value, f"{field} of a ledger entry")
    if row.step_id is not None and not _INT64[0] <= row.step_id <= _INT64[1]:
        raise ValueError(f"step_id of a ledger entry must fit in 64 bits, got {row.step_id}")


def _row_values(row: LedgerEntry) -> tuple[Any, ...]:
    return (
        float(row.ts), row.run_id, row.step_id, row.user_id, row.session_id, row.principal, row.kind, row.purpose,
        row.reason, row.model, row.tier, row.tool, row.input_tokens, row.output_tokens, row.cached_tokens,
        row.reasoning_tokens, float(row.cost_usd), bool(row.estimated),
    )


def _entry(row: tuple[Any, ...]) -> LedgerEntry:
    (ts, run_id, step_id, user_id, session_id, principal, kind, purpose, reason, model, tier, tool,
     input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, estimated) = row
    return LedgerEntry(
        run_id=run_id, user_id=user_id, session_id=session_id, principal=principal, kind=kind,
        cost_usd=float(cost_usd), purpose=purpose, reason=reason, step_id=None if step_id is None else int(step_id),
        model=model, tier=tier, tool=tool, input_tokens=int(input_tokens), output_tokens=int(output_tokens),
        cached_tokens=int(cached_tokens), reasoning_tokens=int(reasoning_tokens), estimated=bool(estimated),
        ts=float(ts),
    )
