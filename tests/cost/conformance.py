"""The conformance suite of the ``agentkeel.cost.store.BudgetStore`` protocol, for every backend.

Use it by subclassing ``BudgetStoreConformance`` in a ``test_*.py`` module, as a
``Test...`` class, and defining the fixture ``make_store``: a callable
``(clock=time.time) -> BudgetStore`` that opens a store on this test's (empty)
state. The fixture closes every store it opened. What needs several handles or
processes is backend-specific (``test_budget_stores``).

Each test is written so that a backend getting its promise wrong fails it: the
amounts are chosen so an off-by-one-scope, a missing epsilon, a reservation
counted twice or not at all, or a row outside a window being counted changes
the outcome.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import attrs
import pytest
from agentkeel.cost.store import GROUPS, BudgetStore, LedgerEntry, ScopeLimit
from agentkeel.errors import BudgetExceededError, StoreError

MakeStore = Callable[..., BudgetStore]

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
EPS = 1e-9
HOUR = 3600.0


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def day(limit: float, user: str = "ann", start: float = T0 - HOUR, end: float = T0 + HOUR) -> ScopeLimit:
    return ScopeLimit("user_day", limit, f"per_user_daily_usd of user {user!r}", user_id=user, start=start, end=end)


def session(limit: float, user: str = "ann", session_id: str = "s-1") -> ScopeLimit:
    return ScopeLimit(
        "session", limit, f"per_session_usd of session {session_id!r} of user {user!r}",
        user_id=user, session_id=session_id,
    )


def month(limit: float, principal: str = "support", start: float = T0 - 10 * HOUR,
          end: float = T0 + 10 * HOUR) -> ScopeLimit:
    return ScopeLimit(
        "principal_month", limit, f"per_principal_monthly_usd of principal {principal!r}",
        principal=principal, start=start, end=end,
    )


def entry(cost: float, **fields: Any) -> LedgerEntry:
    values: dict[str, Any] = {
        "run_id": "run-1", "user_id": "ann", "session_id": "s-1", "principal": "support", "kind": "llm",
        "cost_usd": cost,
    }
    values.update(fields)
    return LedgerEntry(**values)


def reserve(store: BudgetStore, scopes: list[ScopeLimit], amount: float, ttl_s: float = 60.0) -> str:
    return store.reserve(scopes, amount, holder="test-holder", ttl_s=ttl_s)


def total(store: BudgetStore, **filters: Any) -> float:
    return math.fsum(row.cost_usd for row in store.entries(**filters))


# totals(by=...) of TOTALS_ROWS: (key, cost_usd, calls, input_tokens, output_tokens, estimated_usd), in order.
TOTALS_ROWS = (
    entry(0.30, run_id="r1", session_id="s1", tier="fast", model="m-small", reason="first_tier",
          input_tokens=100, output_tokens=10, ts=T0),
    entry(0.50, run_id="r1", session_id="s1", tier="strong", model="m-big", reason="escalation",
          input_tokens=200, output_tokens=20, estimated=True, ts=T0 + 1),
    entry(0.05, run_id="r1", session_id="s1", kind="tool", tool="refund", purpose="tool", reason="tool", ts=T0 + 2),
    entry(0.10, run_id="r2", session_id="s2", tier="fast", model="m-small", reason="first_tier",
          input_tokens=50, output_tokens=5, ts=T0 + 86400),
    entry(0.20, run_id="r3", user_id="bob", session_id="s1", principal="ops", tier="fast", model="m-small",
          reason="replan", input_tokens=10, output_tokens=1, estimated=True, ts=T0 + 86405),
)
TOTALS: dict[str, list[tuple[str, float, int, int, int, float]]] = {
    "tier": [("fast", 0.60, 3, 160, 16, 0.20), ("strong", 0.50, 1, 200, 20, 0.50), ("(none)", 0.05, 1, 0, 0, 0.0)],
    "model": [("m-small", 0.60, 3, 160, 16, 0.20), ("m-big", 0.50, 1, 200, 20, 0.50), ("(none)", 0.05, 1, 0, 0, 0.0)],
    "tool": [("(none)", 1.10, 4, 360, 36, 0.70), ("refund", 0.05, 1, 0, 0, 0.0)],
    "user": [("ann", 0.95, 4, 350, 35, 0.50), ("bob", 0.20, 1, 10, 1, 0.20)],
    "session": [("ann/s1", 0.85, 3, 300, 30, 0.50), ("bob/s1", 0.20, 1, 10, 1, 0.20),
                ("ann/s2", 0.10, 1, 50, 5, 0.0)],
    "day": [("2023-11-14", 0.85, 3, 300, 30, 0.50), ("2023-11-15", 0.30, 2, 60, 6, 0.20)],
    "reason": [("escalation", 0.50, 1, 200, 20, 0.50), ("first_tier", 0.40, 2, 150, 15, 0.0),
               ("replan", 0.20, 1, 10, 1, 0.20), ("tool", 0.05, 1, 0, 0, 0.0)],
    "kind": [("llm", 1.10, 4, 360, 36, 0.70), ("tool", 0.05, 1, 0, 0, 0.0)],
    "run": [("r1", 0.85, 3, 300, 30, 0.50), ("r3", 0.20, 1, 10, 1, 0.20), ("r2", 0.10, 1, 50, 5, 0.0)],
    "principal": [("support", 0.95, 4, 350, 35, 0.50), ("ops", 0.20, 1, 10, 1, 0.20)],
}

BAD_AMOUNTS = [math.nan, math.inf, -math.inf, -0.01, True, "0.1", None, 10**400]
BAD_TTLS = [0, 0.0, -1.0, math.nan, math.inf, True, "60", None]
BAD_ENTRY_FIELDS = [
    ("cost_usd", math.nan), ("cost_usd", -0.01), ("cost_usd", math.inf), ("cost_usd", True), ("cost_usd", "0.1"),
    ("input_tokens", -1), ("output_tokens", -1), ("cached_tokens", -1), ("reasoning_tokens", -1),
    ("input_tokens", 1.5), ("output_tokens", True), ("ts", -1.0), ("ts", math.nan), ("ts", math.inf),
    ("run_id", None), ("user_id", 7), ("model", 3), ("step_id", "1"), ("estimated", 1),
]
BAD_LIMITS = [math.nan, -0.01, math.inf, -math.inf, True, "1.0"]


class BudgetStoreConformance:
    """The tests every ``BudgetStore`` backend must pass (see the module docstring)."""

    @pytest.fixture
    def paris(self) -> Iterator[None]:
        """The process's local zone is Europe/Paris for the test (restored after)."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TZ", "Europe/Paris")
            time.tzset()
            yield
        time.tzset()

    # --- reserve ----------------------------------------------------------------------

    def test_a_reservation_within_the_limit_is_held_until_settled(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        rid = reserve(store, [scope], 0.3)
        assert isinstance(rid, str) and len(rid) == 32 and int(rid, 16) >= 0  # uuid4 hex
        assert store.left(scope) == pytest.approx(0.7)
        other = reserve(store, [scope], 0.7)  # exactly what is left fits
        assert other != rid
        assert store.left(scope) == pytest.approx(0.0, abs=EPS)
        store.settle(rid, entry(0.2))
        store.release(other)
        assert store.left(scope) == pytest.approx(0.8)
        assert isinstance(store, BudgetStore)

    def test_a_refusal_names_the_scope_the_amount_what_is_left_and_the_reset(
        self, make_store: MakeStore, paris: None
    ) -> None:
        store = make_store(clock=FakeClock())
        end = datetime(2023, 11, 15, tzinfo=ZoneInfo("Europe/Paris")).timestamp()
        scope = day(1.0, end=end)
        reserve(store, [scope], 0.6)
        with pytest.raises(BudgetExceededError) as refused:
            reserve(store, [scope], 0.5)
        message = str(refused.value)
        assert "per_user_daily_usd of user 'ann'" in message
        assert "$0.500000" in message  # asked
        assert "$0.400000" in message  # left
        assert "resets at 2023-11-15 00:00 CET" in message
        # nothing was held by the refusal: what was left still fits, and no more
        assert store.left(scope) == pytest.approx(0.4)
        reserve(store, [scope], 0.4)
        assert store.left(scope) == pytest.approx(0.0, abs=EPS)

    def test_a_session_refusal_has_no_reset(self, make_store: MakeStore, paris: None) -> None:
        store = make_store(clock=FakeClock())
        scope = session(0.25)
        with pytest.raises(BudgetExceededError) as refused:
            reserve(store, [scope], 0.3)
        message = str(refused.value)
        assert "per_session_usd of session 's-1' of user 'ann'" in message
        assert "$0.300000" in message and "$0.250000" in message
        assert "reset" not in message
        assert store.left(scope) == pytest.approx(0.25)
        bounded = attrs.evolve(scope, end=T0 + HOUR)  # a session never resets, whatever its end says
        with pytest.raises(BudgetExceededError) as refused:
            reserve(store, [bounded], 0.3)
        assert "reset" not in str(refused.value)

    def test_several_scopes_are_all_or_nothing(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        wide, narrow, third = session(1.0), day(0.5), month(2.0)
        with pytest.raises(BudgetExceededError, match="per_user_daily_usd"):
            reserve(store, [wide, narrow, third], 0.6)  # the second scope refuses
        assert store.left(wide) == pytest.approx(1.0)  # the first holds nothing
        assert store.left(third) == pytest.approx(2.0)
        reserve(store, [wide, narrow, third], 0.4)
        assert [store.left(s) for s in (wide, narrow, third)] == pytest.approx([0.6, 0.1, 1.6])
        with pytest.raises(BudgetExceededError, match="per_session_usd") as refused:
            reserve(store, [session(0.3), day(0.3)], 0.35)  # both would refuse: the first is named
        assert "per_user_daily_usd" not in str(refused.value)
        assert store.entries() == []

    def test_a_scope_counts_only_its_own_user_session_and_principal(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        # ann in session s-2 as principal ops: counts for ann's day, not for session s-1 nor principal support
        store.record(entry(0.2, session_id="s-2", principal="ops"))
        reserve(store, [session(5.0, session_id="s-2"), day(5.0), month(5.0, principal="ops")], 0.1)
        # bob as support: counts for principal support only
        store.record(entry(0.3, user_id="bob", principal="support"))
        reserve(store, [session(5.0, user="bob"), day(5.0, user="bob"), month(5.0)], 0.05)
        assert store.left(day(1.0)) == pytest.approx(1.0 - 0.3)
        assert store.left(session(1.0)) == pytest.approx(1.0)
        assert store.left(session(1.0, session_id="s-2")) == pytest.approx(1.0 - 0.3)
        assert store.left(month(1.0)) == pytest.approx(1.0 - 0.35)
        assert store.left(month(1.0, principal="ops")) == pytest.approx(1.0 - 0.3)
        assert store.left(day(1.0, user="bob")) == pytest.approx(1.0 - 0.35)
        assert store.left(day(1.0, user="cyd")) == pytest.approx(1.0)

    def test_a_windowed_scope_counts_only_rows_and_reservations_inside_it(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        start, end = T0, T0 + 100.0
        window = day(1.0, start=start, end=end)
        store.record(entry(0.08, ts=end))  # the end is outside
        assert store.left(window) == pytest.approx(1.0)
        store.record(entry(0.02, ts=start))  # first instant: inside (written after a later row)
        assert store.left(window) == pytest.approx(1.0 - 0.02)
        store.record(entry(0.04, ts=end - 0.001))  # inside
        store.record(entry(0.01, ts=start - 0.001))  # before
        assert store.left(window) == pytest.approx(1.0 - 0.06)
        assert store.left(month(1.0, start=start, end=end)) == pytest.approx(1.0 - 0.06)
        assert store.left(session(1.0)) == pytest.approx(1.0 - 0.15)  # a session has no window
        reserve(store, [session(9.0)], 0.16, ttl_s=1000.0)  # made at T0, inside the window
        clock.advance(100.0)
        reserve(store, [session(9.0)], 0.32, ttl_s=1000.0)  # made at the window's end: outside
        assert store.left(window) == pytest.approx(1.0 - 0.06 - 0.16)
        later = day(1.0, start=end, end=end + 100.0)
        assert store.left(later) == pytest.approx(1.0 - 0.08 - 0.32)

    def test_a_zero_limit_affords_only_zero(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        scope = day(0.0)
        zero = reserve(store, [scope], 0.0)
        with pytest.raises(BudgetExceededError):
            reserve(store, [scope], 1e-6)
        assert store.left(scope) == 0.0
        store.settle(zero, entry(0.0))
        overspent = day(0.1)
        store.record(entry(0.5))  # spent elsewhere, beyond the limit
        assert store.left(overspent) == 0.0
        reserve(store, [overspent], 0.0)  # a zero amount always fits
        with pytest.raises(BudgetExceededError):
            reserve(store, [overspent], 0.01)

    def test_sums_of_cents_reach_the_limit_exactly(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        for _ in range(100):  # 100 x 0.01 is 1.0000000000000007 in floats: within the limit
            store.settle(reserve(store, [scope], 0.01), entry(0.01))
        with pytest.raises(BudgetExceededError):
            reserve(store, [scope], 0.01)
        assert len(store.entries()) == 100
        assert store.left(scope) == pytest.approx(0.0, abs=EPS)

    # --- settle, release, expiry ---------------------------------------------------------

    def test_settle_replaces_the_reservation_with_its_row(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        scope = day(1.0)
        rid = reserve(store, [scope, session(1.0)], 0.5)
        clock.advance(2.5)
        store.settle(rid, entry(0.125, tier="fast", model="m", input_tokens=7, output_tokens=3))
        assert store.left(scope) == pytest.approx(1.0 - 0.125)
        assert store.left(session(1.0)) == pytest.approx(1.0 - 0.125)
        [row] = store.entries()
        assert row == entry(0.125, tier="fast", model="m", input_tokens=7, output_tokens=3, ts=T0 + 2.5)

    def test_settling_an_unknown_or_expired_reservation_still_writes_its_row(
        self, make_store: MakeStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        scope = day(1.0)
        with caplog.at_level(logging.WARNING):
            store.settle("0" * 32, entry(0.1, run_id="unknown"))
        assert "reservation" in caplog.text and "unknown" in caplog.text
        caplog.clear()
        rid = reserve(store, [scope], 0.5, ttl_s=10.0)
        clock.advance(11.0)
        with caplog.at_level(logging.WARNING):
            store.settle(rid, entry(0.2, run_id="expired"))
        assert rid in caplog.text and "expired" in caplog.text
        assert [row.run_id for row in store.entries()] == ["unknown", "expired"]
        assert store.left(scope) == pytest.approx(1.0 - 0.3)

    def test_settling_twice_writes_one_row(self, make_store: MakeStore, caplog: pytest.LogCaptureFixture) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        rid = reserve(store, [scope], 0.5)
        store.settle(rid, entry(0.1))
        with caplog.at_level(logging.WARNING):
            store.settle(rid, entry(0.2))
        assert "already settled" in caplog.text
        assert [row.cost_usd for row in store.entries()] == [0.1]
        assert store.left(scope) == pytest.approx(0.9)

    def test_a_settlement_above_its_reservation_counts_what_was_spent(
        self, make_store: MakeStore, caplog: pytest.LogCaptureFixture
    ) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        rid = reserve(store, [scope], 0.1)
        with caplog.at_level(logging.WARNING):
            store.settle(rid, entry(0.3))
        assert "$0.300000 was spent" in caplog.text
        assert store.left(scope) == pytest.approx(0.7)

    def test_release_frees_without_a_row_and_is_idempotent(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        rid = reserve(store, [scope], 0.75)
        store.release(rid)
        assert store.left(scope) == pytest.approx(1.0)
        store.release(rid)
        store.release("never-made")
        assert store.left(scope) == pytest.approx(1.0)
        assert store.entries() == []
        settled = reserve(store, [scope], 0.5)
        store.settle(settled, entry(0.25))
        store.release(settled)  # after its settlement: the row stays
        assert store.left(scope) == pytest.approx(0.75)
        assert len(store.entries()) == 1

    def test_an_expired_reservation_no_longer_counts_and_leaves_no_row(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        scope = day(1.0)
        reserve(store, [scope], 0.9, ttl_s=10.0)
        clock.advance(9.5)
        assert store.left(scope) == pytest.approx(0.1)
        with pytest.raises(BudgetExceededError):
            reserve(store, [scope], 0.2)
        clock.advance(0.5)  # now == expires_at: it no longer holds money
        assert store.left(scope) == pytest.approx(1.0)
        reserve(store, [scope], 1.0)
        assert store.entries() == []

    def test_record_writes_a_row_that_counts(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        store.record(entry(0.4, kind="tool", tool="refund"))
        assert store.left(day(1.0)) == pytest.approx(0.6)
        assert store.left(session(1.0)) == pytest.approx(0.6)
        assert store.left(month(1.0)) == pytest.approx(0.6)
        [row] = store.entries()
        assert row.ts == T0 and row.tool == "refund"  # ts 0 is stamped with the clock
        with pytest.raises(BudgetExceededError):
            reserve(store, [day(1.0)], 0.61)

    # --- reports ----------------------------------------------------------------------------

    def test_entries_round_trip_every_field(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        full = LedgerEntry(
            run_id="run-ü", user_id="ann", session_id="s-1", principal="support", kind="llm", cost_usd=0.0123,
            purpose="respond", reason="answer", step_id=4, model="gpt-x", tier="strong", tool=None,
            input_tokens=1234, output_tokens=56, cached_tokens=78, reasoning_tokens=9, estimated=True,
            ts=T0 + 0.125,
        )
        bare = entry(1, ts=T0 + 1)  # an int cost is kept as a float
        store.record(full)
        store.settle(reserve(store, [day(5.0)], 1.0), bare)
        assert store.entries() == [full, attrs.evolve(bare, cost_usd=1.0)]
        assert type(store.entries()[1].cost_usd) is float

    def test_entries_filter_and_order(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        for name, ts, run, user in [("a", 5, "r1", "ann"), ("b", 1, "r1", "ann"), ("c", 5, "r1", "ann"),
                                    ("d", 3, "r2", "bob")]:
            store.record(entry(0.01, purpose=name, ts=T0 + ts, run_id=run, user_id=user))

        def names(**filters: Any) -> list[str]:
            return [row.purpose for row in store.entries(**filters)]

        assert names() == ["b", "d", "a", "c"]  # oldest first; one ts: in the order written
        assert names(run_id="r1") == ["b", "a", "c"]
        assert names(user_id="bob") == ["d"]
        assert names(since=T0 + 3) == ["d", "a", "c"]  # since is inclusive
        assert names(until=T0 + 5) == ["b", "d"]  # until is exclusive
        assert names(since=T0 + 2, until=T0 + 5, user_id="ann") == []
        assert names(limit=2) == ["b", "d"]
        assert names(limit=0) == []
        assert names(run_id="nope") == []
        with pytest.raises(ValueError, match="limit"):
            store.entries(limit=-1)

    @pytest.mark.parametrize("group", GROUPS)
    def test_totals_by_every_group(self, make_store: MakeStore, group: str) -> None:
        store = make_store(clock=FakeClock())
        for row in TOTALS_ROWS:
            store.record(row)
        got = store.totals(group)
        assert [row["key"] for row in got] == [want[0] for want in TOTALS[group]]
        for row, (key, cost, calls, input_tokens, output_tokens, estimated) in zip(got, TOTALS[group], strict=True):
            assert set(row) == {"key", "cost_usd", "calls", "input_tokens", "output_tokens", "estimated_usd"}
            assert row["cost_usd"] == pytest.approx(cost), key
            assert (row["calls"], row["input_tokens"], row["output_tokens"]) == (calls, input_tokens, output_tokens)
            assert row["estimated_usd"] == pytest.approx(estimated), key

    def test_totals_filter_by_user_and_window(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        for row in TOTALS_ROWS:
            store.record(row)

        def keyed(**filters: Any) -> dict[str, float]:
            return {row["key"]: round(row["cost_usd"], 9) for row in store.totals("run", **filters)}

        assert keyed(user_id="ann") == {"r1": 0.85, "r2": 0.10}
        assert keyed(since=T0 + 1) == {"r1": 0.55, "r2": 0.10, "r3": 0.20}
        assert keyed(until=T0 + 86400) == {"r1": 0.85}
        assert keyed(user_id="bob", until=T0 + 86400) == {}

    def test_the_day_of_a_row_is_the_utc_date_of_its_second(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        midnight = datetime(2024, 2, 29, tzinfo=ZoneInfo("UTC")).timestamp()
        store.record(entry(0.1, ts=midnight - 0.0001))
        store.record(entry(0.2, ts=midnight))
        store.record(entry(0.4, ts=midnight + 86399.9999))
        got = {row["key"]: (round(row["cost_usd"], 9), row["calls"]) for row in store.totals("day")}
        assert got == {"2024-02-28": (0.1, 1), "2024-02-29": (0.6, 2)}

    def test_totals_refuse_an_unknown_group_naming_the_allowed(self, make_store: MakeStore) -> None:
        store = make_store()
        with pytest.raises(ValueError, match="tier, model, tool, user, session, day, reason, kind, run, principal"):
            store.totals("colour")

    def test_top_runs(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        for row in TOTALS_ROWS:
            store.record(row)
        top = store.top_runs(2)
        assert [(r["run_id"], r["user_id"], r["session_id"], r["calls"]) for r in top] == [
            ("r1", "ann", "s1", 3), ("r3", "bob", "s1", 1)
        ]
        assert [r["cost_usd"] for r in top] == pytest.approx([0.85, 0.20])
        assert [r["run_id"] for r in store.top_runs(10, user_id="ann")] == ["r1", "r2"]
        assert [r["run_id"] for r in store.top_runs(10, since=T0 + 86400)] == ["r3", "r2"]
        assert [r["run_id"] for r in store.top_runs(10, until=T0 + 1)] == ["r1"]
        assert store.top_runs(0) == []

    def test_run_costs(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        for row in TOTALS_ROWS:
            store.record(row)
        costs = store.run_costs(["r1", "r3", "missing"])
        assert set(costs) == {"r1", "r3"}
        assert costs["r1"] == pytest.approx(0.85) and costs["r3"] == pytest.approx(0.20)
        assert store.run_costs([]) == {}
        many = [f"x{i}" for i in range(1200)] + ["r2"]  # more ids than one SQL statement takes
        assert store.run_costs(many) == pytest.approx({"r2": 0.10})

    # --- invalid input ----------------------------------------------------------------------

    @pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
    def test_an_invalid_amount_is_refused(self, make_store: MakeStore, amount: Any) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        with pytest.raises(ValueError, match="amount_usd"):
            store.reserve([scope], amount, holder="h", ttl_s=60.0)
        assert store.left(scope) == 1.0

    @pytest.mark.parametrize("ttl", BAD_TTLS, ids=repr)
    def test_an_invalid_ttl_is_refused(self, make_store: MakeStore, ttl: Any) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        with pytest.raises(ValueError, match="ttl_s"):
            store.reserve([scope], 0.5, holder="h", ttl_s=ttl)
        assert store.left(scope) == 1.0

    @pytest.mark.parametrize(("field", "value"), BAD_ENTRY_FIELDS, ids=repr)
    def test_an_invalid_ledger_entry_is_refused_and_nothing_written(
        self, make_store: MakeStore, field: str, value: Any
    ) -> None:
        store = make_store(clock=FakeClock())
        scope = day(1.0)
        bad = attrs.evolve(entry(0.1), **{field: value})
        with pytest.raises(ValueError, match=field):
            store.record(bad)
        rid = reserve(store, [scope], 0.5)
        with pytest.raises(ValueError, match=field):
            store.settle(rid, bad)
        assert store.entries() == []
        assert store.left(scope) == pytest.approx(0.5)  # the reservation still holds its money
        store.settle(rid, entry(0.1))  # and can still be settled
        assert len(store.entries()) == 1

    @pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
    def test_an_invalid_limit_is_refused(self, make_store: MakeStore, limit: Any) -> None:
        store = make_store(clock=FakeClock())
        bad = attrs.evolve(day(1.0), limit_usd=limit)
        with pytest.raises(ValueError, match="limit_usd"):
            store.reserve([session(1.0), bad], 0.1, holder="h", ttl_s=60.0)
        with pytest.raises(ValueError, match="limit_usd"):
            store.left(bad)
        assert store.left(session(1.0)) == 1.0

    def test_an_invalid_scope_is_refused(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        with pytest.raises(ValueError, match="user_week"):
            reserve(store, [attrs.evolve(day(1.0), kind="user_week")], 0.1)
        with pytest.raises(ValueError, match="start"):
            store.left(attrs.evolve(day(1.0), start=math.nan))
        with pytest.raises(ValueError, match="two different user_ids"):
            reserve(store, [session(1.0, user="ann"), day(1.0, user="bob")], 0.1)
        with pytest.raises(ValueError, match="sequence"):
            store.reserve(day(1.0), 0.1, holder="h", ttl_s=60.0)  # type: ignore[arg-type]
        assert store.left(day(1.0)) == 1.0

    # --- concurrency and lifetime ------------------------------------------------------------

    def test_threads_never_overspend(self, make_store: MakeStore) -> None:
        store = make_store()
        scope = day(1.0, start=time.time() - HOUR, end=time.time() + HOUR)
        outcomes: list[str] = []
        errors: list[BaseException] = []
        start = threading.Barrier(8)

        def hammer() -> None:
            try:
                start.wait(timeout=30)
                for _ in range(50):
                    try:
                        rid = reserve(store, [scope, session(10.0)], 0.01)
                    except BudgetExceededError:
                        outcomes.append("refused")
                        continue
                    store.settle(rid, entry(0.01))
                    outcomes.append("settled")
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: a check and a hold that are not atomic interleave
        try:
            threads = [threading.Thread(target=hammer) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
        finally:
            sys.setswitchinterval(interval)
        assert errors == []
        assert len(outcomes) == 400
        assert outcomes.count("settled") == 100 and outcomes.count("refused") == 300
        assert len(store.entries()) == 100
        assert total(store) <= 1.0 + EPS
        assert store.left(scope) == pytest.approx(0.0, abs=EPS)

    def test_close_is_idempotent_and_a_closed_store_refuses(self, make_store: MakeStore) -> None:
        store = make_store()
        store.close()
        store.close()
        with pytest.raises(StoreError, match="closed"):
            reserve(store, [day(1.0)], 0.1)
        with pytest.raises(StoreError, match="closed"):
            store.entries()
