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
import math
import numbers
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import attrs

from agentkeel.cost.store import GROUPS, SCOPE_KINDS, LedgerEntry, ScopeLimit
from agentkeel.errors import BudgetExceededError, StoreError

__all__ = ["EPSILON", "MemoryBudgetStore"]

log = logging.getLogger(__name__)

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


def _real(value: object) -> float | None:
    """``value`` as a float when it is a real number (not a bool), else None; a huge int is inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def check_amount(value: object, field: str) -> float:
    """``value`` as USD, or ValueError naming ``field`` unless it is a finite number >= 0."""
    number = _real(value)
    if number is None or not math.isfinite(number) or number < 0:
        raise ValueError(f"{field} must be a finite amount of USD >= 0, got {_shown(value)}")
    return number


def check_ttl(value: object) -> float:
    """``ttl_s`` as seconds, or ValueError unless it is a finite number > 0."""
    number = _real(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"ttl_s must be a finite number of seconds > 0, got {_shown(value)}")
    return number


def check_bound(value: object, field: str) -> float | None:
    """A ``since``/``until`` filter: None, or a number that is not NaN."""
    if value is None:
        return None
    number = _real(value)
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
        bound = _real(getattr(scope, field))
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
    ts = _real(entry.ts)
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
