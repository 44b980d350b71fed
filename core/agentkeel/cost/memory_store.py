"""The in-process ``BudgetStore``: reservations and the ledger in memory, for one process.

Same semantics as ``agentkeel.cost.sqlite_store.SQLiteBudgetStore`` (checked by the
same conformance suite, ``tests/cost/conformance.py``), but nothing survives the
process and nothing is shared with other processes. Thread-safe: one lock guards
every call, so a reservation's check of every scope and its hold are atomic.

A scope's settled spend is summed from per-owner indexes (rows sorted by ``ts``
with running totals), so a reservation costs O(log n) in the ledger's size, not a
scan of it.

The checks, the refusal message and the grouping below the store are shared with
``SQLiteBudgetStore``, so both backends refuse the same things with the same words.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from agentkeel.cost.store import (
    EPSILON,
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
    group_key,
    left_of,
    new_reservation_id,
    refusal,
    settle_notes,
    totals_row,
)
from agentkeel.errors import StoreError

__all__ = ["EPSILON", "MemoryBudgetStore"]

log = logging.getLogger(__name__)

@attrs.frozen
class _Hold:
    owner: ScopeOwner
    amount_usd: float
    created_at: float
    expires_at: float
    holder: str


class _Spend:
    """One owner's settled rows: timestamps kept sorted, with running totals of their costs."""

    __slots__ = ("_costs", "_prefix", "_ts")

    def __init__(self) -> None:
        self._ts: list[float] = []
        self._costs: list[float] = []
        self._prefix: list[float] = [0.0]  # _prefix[i]: sum of _costs[:i]; may lag behind after an insert

    def add(self, ts: float, cost: float) -> None:
        i = bisect.bisect_right(self._ts, ts)
        self._ts.insert(i, ts)
        self._costs.insert(i, cost)
        if i + 1 < len(self._prefix):
            del self._prefix[i + 1:]  # an earlier row: the totals from here on are recomputed on demand

    def between(self, start: float, end: float) -> float:
        """The sum of the costs with ``start <= ts < end``."""
        prefix = self._prefix
        for i in range(len(prefix) - 1, len(self._costs)):
            prefix.append(prefix[i] + self._costs[i])
        lo = bisect.bisect_left(self._ts, start)
        hi = bisect.bisect_left(self._ts, end)
        return max(0.0, prefix[hi] - prefix[lo]) if hi > lo else 0.0


class MemoryBudgetStore:
    """The ``BudgetStore`` protocol in memory. ``clock`` gives the time of reservations,
    their expiry and the rows stamped on write (inject one in tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rows: list[LedgerEntry] = []
        self._holds: dict[str, _Hold] = {}
        self._settled: set[str] = set()
        self._spend: dict[tuple[str, ...], _Spend] = {}
        self._closed = False

    # --- reservations -------------------------------------------------------------------

    def reserve(self, scopes: Sequence[ScopeLimit], amount_usd: float, *, holder: str, ttl_s: float) -> str:
        amount = check_amount(amount_usd, "amount_usd")
        ttl = check_ttl(ttl_s)
        checked, owner = check_scopes(scopes)
        check_text(holder, "holder")
        with self._lock:
            self._check_open()
            now = self._clock()
            self._holds = {rid: hold for rid, hold in self._holds.items() if hold.expires_at > now}
            for scope in checked:
                used = self._used(scope, now)
                if not fits(used, amount, scope.limit_usd):
                    raise refusal(scope, amount, used)
            reservation_id = new_reservation_id()
            self._holds[reservation_id] = _Hold(owner, amount, now, now + ttl, holder)
            return reservation_id

    def settle(self, reservation_id: str, entry: LedgerEntry) -> None:
        check_text(reservation_id, "reservation_id")
        with self._lock:
            self._check_open()
            now = self._clock()
            row = check_entry(entry, now)
            duplicate = reservation_id in self._settled
            hold = None if duplicate else self._holds.pop(reservation_id, None)
            if not duplicate:
                self._write(row)
                self._settled.add(reservation_id)
        settle_notes(reservation_id, duplicate=duplicate, expires_at=None if hold is None else hold.expires_at,
                     amount=None if hold is None else hold.amount_usd, now=now, cost=row.cost_usd)

    def release(self, reservation_id: str) -> None:
        check_text(reservation_id, "reservation_id")
        with self._lock:
            self._check_open()
            self._holds.pop(reservation_id, None)

    def record(self, entry: LedgerEntry) -> None:
        with self._lock:
            self._check_open()
            self._write(check_entry(entry, self._clock()))

    def left(self, scope: ScopeLimit) -> float:
        check_scope(scope)
        with self._lock:
            self._check_open()
            return left_of(scope, self._used(scope, self._clock()))

    # --- reports ------------------------------------------------------------------------

    def entries(self, *, run_id: str | None = None, user_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        if run_id is not None:
            check_text(run_id, "run_id")
        count = None if limit is None else check_count(limit, "limit")
        with self._lock:
            self._check_open()
            rows = [row for row in self._select(user_id, since, until) if run_id is None or row.run_id == run_id]
        rows.sort(key=lambda row: row.ts)  # stable: rows of one ts stay in the order written
        return rows if count is None else rows[:count]

    def totals(self, by: str, *, user_id: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        group = check_group(by)
        with self._lock:
            self._check_open()
            rows = self._select(user_id, since, until)
        sums: dict[str, list[Any]] = {}
        for row in rows:
            acc = sums.setdefault(group_key(group, row), [0.0, 0, 0, 0, 0.0])
            acc[0] += row.cost_usd
            acc[1] += 1
            acc[2] += row.input_tokens
            acc[3] += row.output_tokens
            acc[4] += row.cost_usd if row.estimated else 0.0
        return by_cost((totals_row(key, *acc) for key, acc in sums.items()), "key")

    def top_runs(self, n: int, *, user_id: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[dict[str, Any]]:
        count = check_count(n, "n")
        with self._lock:
            self._check_open()
            rows = self._select(user_id, since, until)
        runs: dict[str, dict[str, Any]] = {}
        for row in rows:
            run = runs.setdefault(row.run_id, {"run_id": row.run_id, "user_id": row.user_id,
                                               "session_id": row.session_id, "cost_usd": 0.0, "calls": 0})
            run["user_id"] = min(run["user_id"], row.user_id)
            run["session_id"] = min(run["session_id"], row.session_id)
            run["cost_usd"] += row.cost_usd
            run["calls"] += 1
        return by_cost(runs.values(), "run_id")[:count]

    def run_costs(self, run_ids: Sequence[str]) -> dict[str, float]:
        wanted = set(check_run_ids(run_ids))
        costs: dict[str, float] = {}
        with self._lock:
            self._check_open()
            for row in self._rows:
                if row.run_id in wanted:
                    costs[row.run_id] = costs.get(row.run_id, 0.0) + row.cost_usd
        return costs

    def close(self) -> None:
        with self._lock:
            self._closed = True

    # --- helpers --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory budget store is closed; open a new MemoryBudgetStore")

    def _used(self, scope: ScopeLimit, now: float) -> float:
        """Settled spend in the scope's window plus the unexpired reservations made in it."""
        key = _spend_key(scope.kind, scope.user_id, scope.session_id, scope.principal)
        spend = self._spend.get(key)
        settled = 0.0 if spend is None else spend.between(scope.start, scope.end)
        held = 0.0
        for hold in self._holds.values():
            if (
                hold.expires_at > now
                and scope.start <= hold.created_at < scope.end
                and _spend_key(scope.kind, *hold.owner) == key
            ):
                held += hold.amount_usd
        return settled + held

    def _write(self, row: LedgerEntry) -> None:
        self._rows.append(row)
        for kind in SCOPE_KINDS:
            key = _spend_key(kind, row.user_id, row.session_id, row.principal)
            self._spend.setdefault(key, _Spend()).add(row.ts, row.cost_usd)

    def _select(self, user_id: object, since: object, until: object) -> list[LedgerEntry]:
        """The rows of ``user_id`` (None: everyone's) with ``since <= ts < until``, as written."""
        user = check_user_filter(user_id)
        low = check_bound(since, "since")
        high = check_bound(until, "until")
        return [
            row for row in self._rows
            if (user is None or row.user_id == user)
            and (low is None or row.ts >= low)
            and (high is None or row.ts < high)
        ]

    def __repr__(self) -> str:
        return f"MemoryBudgetStore(rows={len(self._rows)}, reservations={len(self._holds)})"


def _spend_key(kind: str, user_id: str, session_id: str, principal: str) -> tuple[str, ...]:
    if kind == "session":
        return (kind, user_id, session_id)
    if kind == "user_day":
        return (kind, user_id)
    return (kind, principal)
