"""The budget store conformance suite against PostgreSQL, plus what only a shared server
has: the schema, several stores on one database, processes racing for one budget (each
with its own store and pool), the advisory locks a reservation takes, the differential
history against the in-memory store, and the default ``agentkeel_open_budget_store``
opening a ``PostgresBudgetStore`` when ``[store] url`` is set. Every test gets a fresh,
empty database (``pg_url``); without PostgreSQL they skip (and fail under CI=true)."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from agentkeel import pg
from agentkeel.cost.memory_store import MemoryBudgetStore
from agentkeel.cost.pg_store import PostgresBudgetStore, scope_key
from agentkeel.cost.store import GROUPS, BudgetStore, ScopeLimit
from agentkeel.errors import BudgetExceededError, StoreError
from agentkeel.testing import make_system
from agentkeel.testing.services import free_port

from tests.cost.conformance import (
    EPS,
    HOUR,
    BudgetStoreConformance,
    FakeClock,
    day,
    entry,
    month,
    reserve,
    session,
    total,
)
from tests.cost.test_budget_stores import _history, _run_children


class TestPostgresBudgetStore(BudgetStoreConformance):
    @pytest.fixture
    def make_store(self, pg_url: str) -> Iterator[Callable[..., BudgetStore]]:
        opened: list[PostgresBudgetStore] = []

        def make(clock: Callable[[], float] = time.time) -> BudgetStore:
            opened.append(PostgresBudgetStore(pg_url, clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()


# --- PostgreSQL only: the schema ------------------------------------------------------------------


def test_the_ledger_migration_creates_the_tables_and_indexes(pg_url: str) -> None:
    PostgresBudgetStore(pg_url).close()
    [ledger] = [m for m in pg.PG_MIGRATIONS if m.component == "ledger"]
    assert ledger.version == 2
    with psycopg.connect(pg_url) as conn:
        assert pg.schema_version(conn) == len(pg.PG_MIGRATIONS)

        def columns(table: str) -> set[str]:
            return {row[0] for row in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))}

        assert columns("ledger") == {
            "id", "ts", "run_id", "step_id", "user_id", "session_id", "principal", "kind", "purpose", "reason",
            "model", "tier", "tool", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
            "cost_usd", "estimated", "reservation_id",
        }
        assert columns("budget_reservations") == {
            "id", "user_id", "session_id", "principal", "amount_usd", "created_at", "expires_at", "holder",
        }
        indexes: dict[str, str] = dict(conn.execute(  # name -> definition
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename IN ('ledger', 'budget_reservations')"
        ).fetchall())
        for name, columns_sql in [
            ("ledger_by_user_ts", "(user_id, ts) INCLUDE (cost_usd)"),
            ("ledger_by_session", "(user_id, session_id, ts) INCLUDE (cost_usd)"),
            ("ledger_by_principal_ts", "(principal, ts) INCLUDE (cost_usd)"),
            ("ledger_by_run", "(run_id, ts)"),
            ("ledger_by_ts", "(ts, id)"),
            ("budget_reservations_by_expiry", "(expires_at)"),
            ("budget_reservations_by_user", "(user_id, session_id, created_at)"),
            ("budget_reservations_by_principal", "(principal, created_at)"),
        ]:
            assert columns_sql in indexes[name], name
        assert any("UNIQUE" in sql and "(reservation_id)" in sql for sql in indexes.values())
        # the scope sums use the indexes, not a scan of the ledger (on a ledger of many users and days)
        conn.execute("INSERT INTO ledger (ts, run_id, user_id, session_id, principal, kind, cost_usd) "
                     "SELECT i * 60.0, 'r' || i, 'u' || (i % 200), 's' || (i % 7), 'p' || (i % 5), 'llm', 0.01 "
                     "FROM generate_series(1, 20000) AS i")
        conn.execute("ANALYZE ledger")

        def plan(sql: str) -> str:
            return " ".join(str(r[0]) for r in conn.execute(f"EXPLAIN {sql}"))

        assert "ledger_by_user_ts" in plan(
            "SELECT SUM(cost_usd) FROM ledger WHERE user_id = 'u1' AND ts >= 6000 AND ts < 90000")
        assert "ledger_by_session" in plan(
            "SELECT SUM(cost_usd) FROM ledger WHERE user_id = 'u1' AND session_id = 's1' AND ts >= 0 "
            "AND ts < 'Infinity'")
        assert "ledger_by_principal_ts" in plan(
            "SELECT SUM(cost_usd) FROM ledger WHERE principal = 'p1' AND ts >= 6000 AND ts < 9000")
        assert "ledger_by_run" in plan("SELECT SUM(cost_usd) FROM ledger WHERE run_id = ANY('{r1,r2}')")


def test_a_settled_row_carries_its_reservation_id(pg_url: str) -> None:
    store = PostgresBudgetStore(pg_url)
    try:
        rid = reserve(store, [day(1.0, start=0, end=math.inf)], 0.5)
        store.settle(rid, entry(0.1))
        store.record(entry(0.2))
        store.record(entry(0.3))
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT reservation_id, cost_usd FROM ledger ORDER BY id").fetchall()
        assert rows == [(rid, 0.1), (None, 0.2), (None, 0.3)]  # NULLs do not collide
        assert conn.execute("SELECT count(*) FROM budget_reservations").fetchone() == (0,)


def test_reserve_deletes_expired_reservations(pg_url: str) -> None:
    clock = FakeClock()
    store = PostgresBudgetStore(pg_url, clock=clock)
    try:
        reserve(store, [day(1.0)], 0.1, ttl_s=5.0)
        kept = reserve(store, [day(1.0)], 0.1, ttl_s=500.0)
        clock.advance(10.0)
        reserve(store, [month(1.0)], 0.1, ttl_s=500.0)  # any reservation cleans up, whoever's they were
        with psycopg.connect(pg_url) as conn:
            ids = {row[0] for row in conn.execute("SELECT id FROM budget_reservations")}
        assert len(ids) == 2 and kept in ids
    finally:
        store.close()


# --- PostgreSQL only: several stores, threads, the locks ----------------------------------------


def test_several_stores_on_one_database_share_reservations_and_rows(pg_url: str) -> None:
    clock = FakeClock()
    first, second = PostgresBudgetStore(pg_url, clock=clock), PostgresBudgetStore(pg_url, clock=clock)
    try:
        scope = day(1.0)
        rid = reserve(first, [scope], 0.6)
        with pytest.raises(BudgetExceededError):
            reserve(second, [scope], 0.5)
        second.settle(rid, entry(0.2))  # settled by another store: one row, the hold gone
        first.settle(rid, entry(0.2))
        assert len(first.entries()) == len(second.entries()) == 1
        assert second.left(scope) == pytest.approx(0.8)
        first.close()
        with pytest.raises(StoreError, match="closed; open a new PostgresBudgetStore"):
            first.entries()
        assert second.left(scope) == pytest.approx(0.8)  # the shared pool stays open
    finally:
        first.close()
        second.close()


def test_threads_settling_one_reservation_at_once_write_one_row(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresBudgetStore(pg_url)
    try:
        scope = day(1.0, start=time.time() - HOUR, end=time.time() + HOUR)
        rid = reserve(store, [scope], 0.5)
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def settle() -> None:
            try:
                start.wait(timeout=30)
                store.settle(rid, entry(0.25))
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        with caplog.at_level(logging.WARNING):
            threads = [threading.Thread(target=settle) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert errors == []
        assert [row.cost_usd for row in store.entries()] == [0.25]
        assert caplog.text.count("already settled") == 7
        assert store.left(scope) == pytest.approx(0.75)
    finally:
        store.close()


def _lock_id(conn: psycopg.Connection[Any], key: str) -> int:
    row = conn.execute("SELECT hashtextextended(%s, 0)", (key,)).fetchone()
    assert row is not None
    return int(row[0])


def _reserve_in_thread(store: BudgetStore, scopes: list[ScopeLimit], amount: float) -> threading.Thread:
    thread = threading.Thread(target=lambda: reserve(store, scopes, amount), daemon=True)
    thread.start()
    return thread


def test_a_reservation_locks_every_key_its_owner_counts_towards(pg_url: str) -> None:
    store = PostgresBudgetStore(pg_url, clock=FakeClock())
    blocker = psycopg.connect(pg_url)
    try:
        # Another transaction checks ann's daily scope: it holds ann's user_day key exclusively.
        ann_day = _lock_id(blocker, scope_key("user_day", "ann", "", ""))
        blocker.execute("SELECT pg_advisory_xact_lock(%s)", (ann_day,))
        # A reservation against ann's session alone still adds to ann's day: it waits.
        waiting = _reserve_in_thread(store, [session(1.0)], 0.1)
        # Bob's, and a zero amount of ann's, do not.
        reserve(store, [session(1.0, user="bob"), day(1.0, user="bob")], 0.1)
        reserve(store, [session(1.0), day(1.0)], 0.0)
        waiting.join(timeout=1.0)
        assert waiting.is_alive()
        blocker.rollback()
        waiting.join(timeout=30)
        assert not waiting.is_alive()
        assert store.left(day(1.0)) == pytest.approx(0.9)

        # Only adding to a key takes it shared: two reservations of ann's sessions, each checking
        # only its own session, both go ahead while another transaction holds ann's day shared.
        blocker.execute("SELECT pg_advisory_xact_lock_shared(%s)", (ann_day,))
        reserve(store, [session(1.0, session_id="s-2")], 0.1)
        reserve(store, [session(1.0, session_id="s-3")], 0.1)
        checking = _reserve_in_thread(store, [day(1.0)], 0.1)  # but checking ann's day waits
        checking.join(timeout=1.0)
        assert checking.is_alive()
        blocker.rollback()
        checking.join(timeout=30)
        assert not checking.is_alive()
        assert store.left(day(1.0)) == pytest.approx(0.6)
    finally:
        blocker.close()
        store.close()


def test_text_postgresql_cannot_hold_is_refused_or_matches_nothing(pg_url: str) -> None:
    store = PostgresBudgetStore(pg_url, clock=FakeClock())
    try:
        with pytest.raises(ValueError, match="user_id"):
            reserve(store, [day(1.0, user="a\x00b")], 0.1)
        with pytest.raises(ValueError, match="holder"):
            store.reserve([day(1.0)], 0.1, holder="h\x00", ttl_s=60.0)
        with pytest.raises(ValueError, match="run_id of a ledger entry"):
            store.record(entry(0.1, run_id="r\x00"))
        rid = reserve(store, [day(1.0)], 0.5)
        with pytest.raises(ValueError, match="model of a ledger entry"):
            store.settle(rid, entry(0.1, model="\ud800"))
        with pytest.raises(ValueError, match="step_id"):
            store.record(entry(0.1, step_id=2**63))
        with pytest.raises(ValueError, match="reservation_id"):
            store.settle("\x00", entry(0.1))
        assert store.entries() == [] and store.left(day(1.0)) == pytest.approx(0.5)
        store.settle(rid, entry(0.1))
        store.release("\x00")
        assert store.left(day(1.0, user="\x00")) == 1.0
        assert store.entries(user_id="\x00") == [] and store.entries(run_id="\ud800") == []
        assert store.totals("run", user_id="\x00") == [] and store.top_runs(3, user_id="\x00") == []
        assert store.run_costs(["\x00", "run-1"]) == pytest.approx({"run-1": 0.1})
    finally:
        store.close()


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    url = f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError) as info:
        PostgresBudgetStore(url)
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)


# --- PostgreSQL only: processes, each with its own store ----------------------------------------


def _hammer_process(url: str, scope: ScopeLimit, attempts: int, barrier: Any, results: Any) -> None:
    """A child process: reserve and settle a cent ``attempts`` times against ``scope``."""
    try:
        store = PostgresBudgetStore(url)
    except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
        results.put(("error", repr(exc)))
        return
    settled = refused = 0
    try:
        barrier.wait(timeout=60)
        for i in range(attempts):
            try:
                rid = store.reserve([scope, session(10.0)], 0.01, holder=f"pid-{os.getpid()}", ttl_s=60.0)
            except BudgetExceededError:
                refused += 1
                continue
            store.settle(rid, entry(0.01, run_id=f"{os.getpid()}-{i}"))
            settled += 1
        results.put(("done", settled, refused))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))
    finally:
        store.close()


def _skew_rounds_process(url: str, rounds: int, which: int, barrier: Any, results: Any) -> None:
    """A child process: each round, for a fresh user, reserve 0.6 of a 1.0 budget, against the
    user's day (even ``which``) or against the user's session "" alone (odd): each reservation
    adds to the other's scope, so one of all the processes wins each round."""
    try:
        store = PostgresBudgetStore(url)
    except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
        results.put(("error", repr(exc)))
        return
    won: list[str] = []
    now = time.time()
    try:
        for i in range(rounds):
            user = f"u{i}"
            scope = (day(1.0, user=user, start=now - HOUR, end=now + HOUR) if which % 2 == 0
                     else session(1.0, user=user, session_id=""))
            barrier.wait(timeout=60)
            try:
                store.reserve([scope], 0.6, holder=f"pid-{os.getpid()}", ttl_s=600.0)
            except BudgetExceededError:
                continue
            won.append(user)
        results.put(("done", won))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))
    finally:
        store.close()


def test_processes_hammering_one_daily_budget_never_overspend(pg_url: str) -> None:
    PostgresBudgetStore(pg_url).close()  # migrated before the children race
    now = time.time()
    scope = day(0.5, start=now - HOUR, end=now + HOUR)
    procs_n, attempts = 4, 40
    reports = _run_children(multiprocessing.get_context("spawn"), _hammer_process, (pg_url, scope, attempts),
                            procs_n)
    settled = sum(r[1] for r in reports)
    refused = sum(r[2] for r in reports)
    assert settled + refused == procs_n * attempts
    assert refused > 0
    store = PostgresBudgetStore(pg_url)
    try:
        rows = store.entries()
        assert len(rows) == settled == 50  # the budget was used up, not just refused
        assert total(store) <= 0.5 + EPS
        assert len({row.run_id.split("-")[0] for row in rows}) >= 2  # more than one process won some
        assert store.left(scope) == pytest.approx(0.0, abs=EPS)
    finally:
        store.close()


def test_processes_checking_different_scopes_of_one_owner_have_one_winner_each_round(pg_url: str) -> None:
    PostgresBudgetStore(pg_url).close()
    ctx = multiprocessing.get_context("spawn")
    rounds, procs_n = 25, 4
    barrier, results = ctx.Barrier(procs_n), ctx.Queue()
    procs = [ctx.Process(target=_skew_rounds_process, args=(pg_url, rounds, i, barrier, results))
             for i in range(procs_n)]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert [r for r in reports if r[0] != "done"] == []
    winners = sorted(user for r in reports for user in r[1])
    assert winners == sorted(f"u{i}" for i in range(rounds))  # never two: neither scope went over
    with psycopg.connect(pg_url) as conn:
        held = conn.execute("SELECT user_id, sum(amount_usd) FROM budget_reservations GROUP BY user_id").fetchall()
    assert all(amount == pytest.approx(0.6) for _, amount in held) and len(held) == rounds


# --- PostgreSQL and memory: one random history, the same answers -----------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_postgres_and_memory_answer_a_random_history_alike(pg_url: str, seed: int) -> None:
    memory_clock, pg_clock = FakeClock(), FakeClock()
    memory = MemoryBudgetStore(clock=memory_clock)
    postgres = PostgresBudgetStore(pg_url, clock=pg_clock)
    try:
        expected = _history(memory, memory_clock, seed)
        got = _history(postgres, pg_clock, seed)
    finally:
        memory.close()
        postgres.close()
    assert sum(1 for a in expected if a[0] == "refused") > 5  # the history exercises refusals
    assert sum(1 for a in expected if a[0] == "reserved") > 5
    assert len(expected[-1 - len(GROUPS) - 2][1]) > 10  # and writes rows
    for want, have in zip(expected, got, strict=True):
        assert have == want


# --- the hook ------------------------------------------------------------------------------------


def test_the_default_store_is_postgres_when_store_url_is_set(pg_url: str) -> None:
    with make_system(config={"store": {"url": pg_url}}) as system:
        store = system.budgets
        assert isinstance(store, PostgresBudgetStore) and store.url == pg_url
        store.record(entry(0.25, run_id="shared"))
    # the URL wins over the memory journal: budgets must be shared by the replicas
    with make_system(config={"store": {"url": pg_url}, "journal": {"backend": "memory"}}) as system:
        store = system.budgets
        assert isinstance(store, PostgresBudgetStore)
        assert store.run_costs(["shared"]) == pytest.approx({"shared": 0.25})
    with make_system(config={"journal": {"backend": "memory"}}) as system:
        assert isinstance(system.budgets, MemoryBudgetStore)
