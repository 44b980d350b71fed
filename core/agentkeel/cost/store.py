"""The cost ledger and the budgets of every scope: one store, so a settlement is one write.

Every priced event (an LLM call of the planner, the responder or a judge; a
priced tool call) ends as one ``LedgerEntry`` row. Budgets are limits on the
sum of those rows within a *scope*: a user's session, a user's calendar day
(in ``[budget] timezone``), a principal's calendar month. Before a priced call
its worst case is *reserved* against every scope that applies, atomically; after
the call the reservation is *settled*: in one transaction the reservation is
removed and the ledger row written. So spend is never unrecorded (a settled call
has its row) and never counted twice (the row replaces the reservation). A
reservation that is never settled (its process died) expires at ``expires_at``
and stops holding money; the ledger then has no row for it: no phantom spend.

Backends: ``agentkeel.cost.sqlite_store.SQLiteBudgetStore`` (``<home>/agentkeel.db``,
shared by processes) and ``agentkeel.cost.memory_store.MemoryBudgetStore``
(one process). Both pass ``tests/cost/conformance.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

__all__ = [
    "GROUPS",
    "BudgetStore",
    "LedgerEntry",
    "ScopeLimit",
]

SCOPE_KINDS = ("session", "user_day", "principal_month")
"""``session``: one user's session; ``user_day``: a user's calendar day; ``principal_month``: a principal's month."""

GROUPS = ("tier", "model", "tool", "user", "session", "day", "reason", "kind", "run", "principal")
"""What ``BudgetStore.totals`` can group by."""


@attrs.frozen
class ScopeLimit:
    """A limit on what the ledger may hold (settled rows plus open reservations) for one scope.

    ``kind`` is one of ``SCOPE_KINDS``. ``user_id``/``session_id``/``principal``
    name whose spending counts (``session``: user_id and session_id; ``user_day``:
    user_id; ``principal_month``: principal). ``start``/``end`` bound the time
    window (Unix seconds; ``session`` has no window: 0 and +inf). ``label`` says
    in words which limit this is (``"per_user_daily_usd of user 'ann'"``), for the
    refusal message, and ``end`` is when it resets, shown in ``timezone`` (an IANA
    name; "" for the process's local zone).
    """

    kind: str
    limit_usd: float
    label: str
    user_id: str = ""
    session_id: str = ""
    principal: str = ""
    start: float = 0.0
    end: float = float("inf")
    timezone: str = ""


@attrs.frozen
class LedgerEntry:
    """One priced event.

    ``kind``: "llm" or "tool". ``purpose``: what the call was for ("plan",
    "respond", "judge", "summarise", "tool"). ``reason``: why it was made
    ("first_tier", "escalation", "repair", "replan", "round", "answer", "tool").
    ``ts`` 0 is stamped with the store's clock on write.
    """

    run_id: str
    user_id: str
    session_id: str
    principal: str
    kind: str
    cost_usd: float
    purpose: str = ""
    reason: str = ""
    step_id: int | None = None
    model: str | None = None
    tier: str | None = None
    tool: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    ts: float = 0.0


@runtime_checkable
class BudgetStore(Protocol):
    """Reservations against scoped limits, and the ledger they settle into. Thread- and
    (SQLite) process-safe; every method is synchronous and commits before it returns."""

    def reserve(self, scopes: Sequence[ScopeLimit], amount_usd: float, *, holder: str, ttl_s: float) -> str:
        """Hold ``amount_usd`` against every scope at once, or against none.

        Atomic: for every scope, the settled rows in its window plus the unexpired
        reservations that count towards it plus ``amount_usd`` must stay within its
        limit; otherwise ``BudgetExceededError`` naming the first scope that cannot
        afford it (its ``label``, what is left, and when it resets), and nothing is
        held. A reservation counts towards a windowed scope when it was made inside
        the window. Returns the reservation's id. ``ValueError`` for an amount or a
        ttl that is not a finite number (amount >= 0, ttl > 0).
        """
        ...

    def settle(self, reservation_id: str, entry: LedgerEntry) -> None:
        """Remove the reservation and write ``entry`` to the ledger, in one transaction.
        An unknown or expired reservation still gets its row (the money was spent) and
        a ``reservation`` note in the log; settling the same id twice writes one row."""
        ...

    def release(self, reservation_id: str) -> None:
        """Remove the reservation without spending (the call was never made). Idempotent."""
        ...

    def record(self, entry: LedgerEntry) -> None:
        """Write a ledger row with no reservation (money spent that was not reserved here)."""
        ...

    def left(self, scope: ScopeLimit) -> float:
        """What ``scope`` can still afford now (its limit minus settled spend and open reservations)."""
        ...

    def entries(self, *, run_id: str | None = None, user_id: str | None = None, since: float | None = None,
                until: float | None = None, limit: int | None = None) -> list[LedgerEntry]:
        """Ledger rows, oldest first, filtered."""
        ...

    def totals(self, by: str, *, user_id: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        """Spending grouped by ``by`` (one of ``GROUPS``; "day" is the UTC date of the row):
        ``[{"key", "cost_usd", "calls", "input_tokens", "output_tokens", "estimated_usd"}]``,
        most expensive first. ``ValueError`` naming the allowed groups otherwise."""
        ...

    def top_runs(self, n: int, *, user_id: str | None = None, since: float | None = None,
                 until: float | None = None) -> list[dict[str, Any]]:
        """The ``n`` most expensive runs: ``[{"run_id", "user_id", "session_id", "cost_usd", "calls"}]``."""
        ...

    def run_costs(self, run_ids: Sequence[str]) -> dict[str, float]:
        """What the ledger holds for each of ``run_ids`` (runs with no row are left out)."""
        ...

    def close(self) -> None:
        """Release resources. Idempotent."""
        ...
