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

import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import attrs

from agentkeel.errors import BudgetExceededError
from agentkeel.jsonvalue import real_number

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


# --- checks, refusals and grouping, shared by the backends -----------------------------------

log = logging.getLogger("agentkeel.cost")

EPSILON = 1e-9
"""USD: sums within this of a limit are within it (floating-point sums of cents are not exact)."""

MAX_TS = 253402300800.0
"""Year 10000: a ledger timestamp must be before it (and >= 0), so its date can be written."""

MAX_TOKENS = 2**63 - 1
"""The largest token count a ledger row can hold (SQLite's INTEGER)."""

NONE_KEY = "(none)"
"""The ``totals`` key of rows with no tier, model or tool."""

_TEXT_FIELDS = ("run_id", "user_id", "session_id", "principal", "kind", "purpose", "reason")
_OPTIONAL_TEXT_FIELDS = ("model", "tier", "tool")
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens")


# --- checks, errors and grouping shared with SQLiteBudgetStore ------------------------------


class ScopeOwner(NamedTuple):
    """Whose reservation it is: the user, session and principal of the scopes it was made against
    ("" for those no scope names). It counts towards a scope whose owner fields match."""

    user_id: str
    session_id: str
    principal: str


def check_amount(value: object, field: str) -> float:
    """``value`` as USD, or ValueError naming ``field`` unless it is a finite number >= 0."""
    number = real_number(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{field} must be a finite amount of USD >= 0, got {_shown(value)}")
    return number


def check_ttl(value: object) -> float:
    """``ttl_s`` as seconds, or ValueError unless it is a finite number > 0."""
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"ttl_s must be a finite number of seconds > 0, got {_shown(value)}")
    return number


def check_bound(value: object, field: str) -> float | None:
    """A ``since``/``until`` filter: None, or a number that is not NaN."""
    if value is None:
        return None
    number = real_number(value)
    if number is None or math.isnan(number):
        raise ValueError(f"{field} must be None or a Unix time in seconds, got {_shown(value)}")
    return number


def check_count(value: object, field: str) -> int:
    """A ``limit``/``n``: a whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{field} must be a whole number >= 0, got {_shown(value)}")
    return value


def check_text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {_shown(value)}")
    return value


def check_user_filter(value: object) -> str | None:
    return None if value is None else check_text(value, "user_id")


def check_run_ids(run_ids: object) -> list[str]:
    if isinstance(run_ids, str) or not isinstance(run_ids, Iterable):
        raise ValueError(f"run_ids must be a sequence of run ids, got {_shown(run_ids)}")
    return [check_text(run_id, "a run id") for run_id in run_ids]


def check_group(by: object) -> str:
    if by not in GROUPS:
        raise ValueError(f"cannot group spending by {_shown(by)}; group by one of {', '.join(GROUPS)}")
    return str(by)


def check_scope(scope: object) -> ScopeLimit:
    """``scope`` unless it is not a ``ScopeLimit`` of a known kind with a valid limit and window."""
    if not isinstance(scope, ScopeLimit):
        raise ValueError(f"a budget scope must be a ScopeLimit, got {_shown(scope)}")
    if scope.kind not in SCOPE_KINDS:
        raise ValueError(
            f"budget scope {scope.label!r} has kind {_shown(scope.kind)}; the kinds are {', '.join(SCOPE_KINDS)}"
        )
    check_amount(scope.limit_usd, f"limit_usd of budget scope {scope.label!r}")
    for field in ("start", "end"):
        bound = real_number(getattr(scope, field))
        if bound is None or math.isnan(bound):
            raise ValueError(
                f"{field} of budget scope {scope.label!r} must be a Unix time, got {_shown(getattr(scope, field))}"
            )
    for field in ("label", "user_id", "session_id", "principal"):
        check_text(getattr(scope, field), f"{field} of budget scope {scope.label!r}")
    return scope


def check_scopes(scopes: object) -> tuple[tuple[ScopeLimit, ...], ScopeOwner]:
    """The scopes of one reservation, and its owner; ValueError when the scopes name two owners."""
    if isinstance(scopes, ScopeLimit) or not isinstance(scopes, Sequence):
        raise ValueError(f"scopes must be a sequence of ScopeLimit, got {_shown(scopes)}")
    checked = tuple(check_scope(scope) for scope in scopes)
    owner: dict[str, str] = {}
    for scope in checked:
        for field in owner_fields(scope.kind):
            value = getattr(scope, field)
            if owner.setdefault(field, value) != value:
                raise ValueError(
                    f"the scopes of one reservation name two different {field}s ({owner[field]!r} and "
                    f"{value!r}, in {scope.label!r}); reserve for one owner at a time"
                )
    return checked, ScopeOwner(owner.get("user_id", ""), owner.get("session_id", ""), owner.get("principal", ""))


def owner_fields(kind: str) -> tuple[str, ...]:
    """Which owner fields a scope of ``kind`` matches on."""
    if kind == "session":
        return ("user_id", "session_id")
    if kind == "user_day":
        return ("user_id",)
    return ("principal",)


def check_entry(entry: object, now: float) -> LedgerEntry:
    """``entry`` with its numbers normalised and ``ts`` 0 stamped ``now``; ValueError naming the
    field that is wrong (nothing is written then)."""
    if not isinstance(entry, LedgerEntry):
        raise ValueError(f"a ledger entry must be a LedgerEntry, got {_shown(entry)}")
    for field in _TEXT_FIELDS:
        check_text(getattr(entry, field), f"{field} of a ledger entry")
    for field in _OPTIONAL_TEXT_FIELDS:
        value = getattr(entry, field)
        if value is not None:
            check_text(value, f"{field} of a ledger entry")
    step_id = entry.step_id
    if step_id is not None and (isinstance(step_id, bool) or not isinstance(step_id, int)):
        raise ValueError(f"step_id of a ledger entry must be None or a whole number, got {_shown(step_id)}")
    for field in TOKEN_FIELDS:
        value = getattr(entry, field)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise ValueError(f"{field} of a ledger entry must be a whole number of tokens >= 0, got {_shown(value)}")
    if not isinstance(entry.estimated, bool):
        raise ValueError(f"estimated of a ledger entry must be True or False, got {_shown(entry.estimated)}")
    cost = check_amount(entry.cost_usd, "cost_usd of a ledger entry")
    ts = real_number(entry.ts)
    if ts is None or not 0 <= ts < MAX_TS:
        raise ValueError(f"ts of a ledger entry must be a Unix time >= 0 (0: now), got {_shown(entry.ts)}")
    return attrs.evolve(
        entry, cost_usd=cost, ts=ts if ts > 0 else float(now), step_id=None if step_id is None else int(step_id),
        input_tokens=int(entry.input_tokens), output_tokens=int(entry.output_tokens),
        cached_tokens=int(entry.cached_tokens), reasoning_tokens=int(entry.reasoning_tokens),
    )


def fits(used: float, amount: float, limit: float) -> bool:
    """Whether ``amount`` more keeps ``used`` within ``limit`` (a zero amount always fits)."""
    return amount == 0 or used + amount <= limit + EPSILON


def left_of(scope: ScopeLimit, used: float) -> float:
    return max(0.0, scope.limit_usd - used)


def resets_at(scope: ScopeLimit) -> str:
    """When a windowed scope resets: its ``end`` in the scope's time zone (the local one when
    it names none), with the zone ("" for a session)."""
    if scope.kind == "session" or not math.isfinite(scope.end):
        return ""
    try:
        if scope.timezone:
            import datetime as dt
            import zoneinfo

            return dt.datetime.fromtimestamp(scope.end, zoneinfo.ZoneInfo(scope.timezone)).strftime("%Y-%m-%d %H:%M %Z")
        return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(scope.end))
    except (OverflowError, OSError, ValueError, LookupError):
        return ""


def refusal(scope: ScopeLimit, amount: float, used: float) -> BudgetExceededError:
    """The error of a reservation ``scope`` cannot afford."""
    left = left_of(scope, used)
    when = resets_at(scope)
    reset = f"; it resets at {when}" if when else ""
    return BudgetExceededError(
        f"the budget {scope.label} cannot afford ${amount:.6f}: only ${left:.6f} of its "
        f"${scope.limit_usd:.6f} is left{reset}"
    )


def day_of(ts: float) -> str:
    """The UTC date of ``ts``, YYYY-MM-DD (the whole second it falls in decides)."""
    return time.strftime("%Y-%m-%d", time.gmtime(int(ts)))


def group_key(by: str, entry: LedgerEntry) -> str:
    """The ``totals`` key of ``entry`` when grouping ``by``."""
    if by in ("tier", "model", "tool"):
        value: str | None = getattr(entry, by)
        return NONE_KEY if value is None else value
    if by == "user":
        return entry.user_id
    if by == "session":
        return f"{entry.user_id}/{entry.session_id}"
    if by == "day":
        return day_of(entry.ts)
    if by == "run":
        return entry.run_id
    value = getattr(entry, by)  # reason, kind, principal
    return str(value)


def totals_row(key: str, cost: float, calls: int, input_tokens: int, output_tokens: int,
               estimated: float) -> dict[str, Any]:
    return {
        "key": key,
        "cost_usd": float(cost),
        "calls": int(calls),
        "input_tokens": int(input_tokens),
        "output_tokens": int(output_tokens),
        "estimated_usd": float(estimated),
    }


def by_cost(rows: Iterable[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Most expensive first; ties by ``key``."""
    return sorted(rows, key=lambda row: (-row["cost_usd"], row[key]))


def settle_notes(reservation_id: str, *, duplicate: bool, expires_at: float | None, amount: float | None,
                 now: float, cost: float) -> None:
    """Log what was unusual about a settlement."""
    if duplicate:
        log.warning("reservation %s was already settled; its ledger row is kept, the second one not written",
                    reservation_id)
        return
    if expires_at is None:
        log.warning("reservation %s is unknown (expired and removed, released, or never made); "
                    "the ledger row is written anyway: the money was spent", reservation_id)
    elif expires_at <= now:
        log.warning("reservation %s had expired %.3fs before it was settled; the ledger row is written anyway",
                    reservation_id, now - expires_at)
    if amount is not None and cost > amount * (1 + EPSILON) + 1e-12:
        log.warning("reservation %s held $%.6f but $%.6f was spent; the ledger counts what was spent",
                    reservation_id, amount, cost)


def new_reservation_id() -> str:
    return uuid.uuid4().hex


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the store ------------------------------------------------------------------------------
