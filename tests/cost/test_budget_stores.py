"""The budget store conformance suite, run against both backends, plus SQLite-only checks
(the schema, several handles, processes, fork, errors) and a differential test that
replays one random history against both and compares every answer."""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkeel.cost.memory_store import MemoryBudgetStore
from agentkeel.cost.sqlite_store import SQLiteBudgetStore
from agentkeel.cost.store import GROUPS, BudgetStore, LedgerEntry, ScopeLimit
from agentkeel.errors import BudgetExceededError, StoreError
from agentkeel.stores import MIGRATIONS, db_path, open_db, schema_version

from tests.cost.conformance import (
    EPS,
    HOUR,
    T0,
    BudgetStoreConformance,
    FakeClock,
    day,
    entry,
    month,
    reserve,
    session,
    total,
)


class TestMemoryBudgetStore(BudgetStoreConformance):
    @pytest.fixture
    def make_store(self) -> Iterator[Callable[..., BudgetStore]]:
        opened: list[MemoryBudgetStore] = []

        def make(clock: Callable[[], float] = time.time) -> BudgetStore:
            opened.append(MemoryBudgetStore(clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()


class TestSQLiteBudgetStore(BudgetStoreConformance):
    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Iterator[Callable[..., BudgetStore]]:
        opened: list[SQLiteBudgetStore] = []

        def make(clock: Callable[[], float] = time.time) -> BudgetStore:
            opened.append(SQLiteBudgetStore(tmp_path / "home", clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()


# --- SQLite only: the schema -----------------------------------------------------------------


def test_the_cost_migration_creates_the_tables_and_indexes(tmp_path: Path) -> None:
    SQLiteBudgetStore(tmp_path).close()
    assert MIGRATIONS[4].component == "cost"
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
        assert columns == {
            "id", "ts", "run_id", "step_id", "user_id", "session_id", "principal", "kind", "purpose", "reason",
            "model", "tier", "tool", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens",
            "cost_usd", "estimated", "reservation_id",
        }
        reservation_columns = {row[1] for row in conn.execute("PRAGMA table_info(budget_reservations)")}
        assert reservation_columns == {
            "id", "user_id", "session_id", "principal", "amount_usd", "created_at", "expires_at", "holder",
        }

        def indexed(table: str) -> set[tuple[str, ...]]:
            names = [row[1] for row in conn.execute(f"PRAGMA index_list({table})")]
            return {tuple(r[2] for r in conn.execute(f"PRAGMA index_info({name})")) for name in names}

        assert {("user_id", "ts", "cost_usd"), ("user_id", "session_id", "cost_usd"),
                ("principal", "ts", "cost_usd"), ("run_id",), ("reservation_id",)} <= indexed("ledger")
        assert ("expires_at",) in indexed("budget_reservations")
        # the scope sums use the indexes, not a scan of the ledger
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT SUM(cost_usd) FROM ledger WHERE user_id = 'a' AND ts >= 0 AND ts < 1"
        ))
        assert "ledger_by_user_ts" in plan
    finally:
        conn.close()


def test_a_settled_row_carries_its_reservation_id(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path)
    try:
        rid = reserve(store, [day(1.0, start=0, end=math.inf)], 0.5)
        store.settle(rid, entry(0.1))
        store.record(entry(0.2))
        store.record(entry(0.3))
    finally:
        store.close()
    conn = sqlite3.connect(db_path(tmp_path))
    try:
        rows = conn.execute("SELECT reservation_id, cost_usd FROM ledger ORDER BY id").fetchall()
        assert rows == [(rid, 0.1), (None, 0.2), (None, 0.3)]  # NULLs do not collide
        assert conn.execute("SELECT count(*) FROM budget_reservations").fetchone() == (0,)
    finally:
        conn.close()


def test_reserve_deletes_expired_reservations(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SQLiteBudgetStore(tmp_path, clock=clock)
    try:
        reserve(store, [day(1.0)], 0.1, ttl_s=5.0)
        kept = reserve(store, [day(1.0)], 0.1, ttl_s=500.0)
        clock.advance(10.0)
        reserve(store, [day(1.0)], 0.1, ttl_s=500.0)
        conn = open_db(tmp_path)
        try:
            ids = {row[0] for row in conn.execute("SELECT id FROM budget_reservations")}
        finally:
            conn.close()
        assert len(ids) == 2 and kept in ids
    finally:
        store.close()


# --- SQLite only: several handles, processes, fork --------------------------------------------


def test_two_handles_share_reservations_and_rows(tmp_path: Path) -> None:
    clock = FakeClock()
    mine, theirs = SQLiteBudgetStore(tmp_path, clock=clock), SQLiteBudgetStore(tmp_path, clock=clock)
    try:
        scope = day(1.0)
        rid = reserve(mine, [scope], 0.6)
        assert theirs.left(scope) == pytest.approx(0.4)
        with pytest.raises(BudgetExceededError):
            reserve(theirs, [scope], 0.5)
        theirs.settle(rid, entry(0.2))  # settled by another handle than the one that reserved
        mine.settle(rid, entry(0.3))  # and again: still one row
        assert [row.cost_usd for row in mine.entries()] == [0.2]
        assert mine.left(scope) == pytest.approx(0.8)
    finally:
        mine.close()
        theirs.close()


def test_threads_with_their_own_handles_never_overspend(tmp_path: Path) -> None:
    now = time.time()
    scope = day(0.5, start=now - HOUR, end=now + HOUR)
    lasts = [day(0.01, user=f"u{i}", start=now - HOUR, end=now + HOUR) for i in range(30)]
    SQLiteBudgetStore(tmp_path).close()
    outcomes: list[str] = []
    won: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def hammer() -> None:
        store = SQLiteBudgetStore(tmp_path)
        try:
            for last in lasts:  # rounds: all threads at once for one last cent
                start.wait(timeout=30)
                try:
                    rid = reserve(store, [last], 0.01)
                except BudgetExceededError:
                    continue
                store.settle(rid, entry(0.01, user_id=last.user_id))
                won.append(last.user_id)
            for _ in range(30):
                try:
                    rid = reserve(store, [scope], 0.01)
                except BudgetExceededError:
                    outcomes.append("refused")
                    continue
                store.settle(rid, entry(0.01))
                outcomes.append("settled")
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            store.close()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert sorted(won) == sorted(last.user_id for last in lasts)
    assert outcomes.count("settled") == 50 and outcomes.count("refused") == 70
    store = SQLiteBudgetStore(tmp_path)
    try:
        assert len(store.entries(user_id="ann")) == 50 and total(store, user_id="ann") <= 0.5 + EPS
    finally:
        store.close()


def _hammer_process(home: str, scope: ScopeLimit, attempts: int, barrier: Any, results: Any) -> None:
    """A child process: reserve and settle a cent ``attempts`` times against ``scope``."""
    try:
        store = SQLiteBudgetStore(home)
    except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
        results.put(("error", repr(exc)))
        return
    settled = refused = 0
    try:
        barrier.wait(timeout=60)
        for i in range(attempts):
            try:
                rid = store.reserve([scope], 0.01, holder=f"pid-{os.getpid()}", ttl_s=60.0)
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


def _race_rounds_process(home: str, scopes: list[ScopeLimit], barrier: Any, results: Any) -> None:
    """A child process: for each scope, wait for the others, then try to take all of it at once."""
    try:
        store = SQLiteBudgetStore(home)
    except Exception as exc:  # noqa: BLE001 - reported, so the test fails with the cause
        results.put(("error", repr(exc)))
        return
    won: list[str] = []
    try:
        for scope in scopes:
            barrier.wait(timeout=60)
            try:
                rid = store.reserve([scope], scope.limit_usd, holder=f"pid-{os.getpid()}", ttl_s=60.0)
            except BudgetExceededError:
                continue
            store.settle(rid, entry(scope.limit_usd, user_id=scope.user_id, run_id=str(os.getpid())))
            won.append(scope.user_id)
        results.put(("done", won))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put(("error", repr(exc)))
    finally:
        store.close()


def _run_children(ctx: Any, target: Callable[..., None], args: tuple[Any, ...], n: int) -> list[tuple[Any, ...]]:
    """Start ``n`` processes of ``target(*args, barrier, results)``; their reports once all have exited."""
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(n)]
    for proc in procs:
        proc.start()
    reports: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 120
    while len(reports) < n and time.monotonic() < deadline:
        try:
            reports.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                break
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert [r for r in reports if r[0] != "done"] == []
    assert len(reports) == n
    return reports


def test_processes_racing_for_the_last_cent_have_one_winner_each_time(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    SQLiteBudgetStore(home).close()  # the file exists before the children open it
    now = time.time()
    scopes = [day(0.01, user=f"u{i}", start=now - HOUR, end=now + HOUR) for i in range(30)]
    reports = _run_children(multiprocessing.get_context("spawn"), _race_rounds_process, (home, scopes), 3)
    winners = sorted(user for r in reports for user in r[1])
    assert winners == sorted(s.user_id for s in scopes)  # each scope: exactly one process won it
    store = SQLiteBudgetStore(home)
    try:
        for scope in scopes:
            assert total(store, user_id=scope.user_id) == pytest.approx(0.01)
    finally:
        store.close()


@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_processes_hammering_one_daily_budget_never_overspend(tmp_path: Path, context: str) -> None:
    home = str(tmp_path / "home")
    SQLiteBudgetStore(home).close()  # the file exists before the children open it
    now = time.time()
    scope = day(0.5, start=now - HOUR, end=now + HOUR)
    procs_n, attempts = 3, 40
    reports = _run_children(multiprocessing.get_context(context), _hammer_process, (home, scope, attempts), procs_n)
    settled = sum(r[1] for r in reports)
    refused = sum(r[2] for r in reports)
    assert settled + refused == procs_n * attempts
    store = SQLiteBudgetStore(home)
    try:
        rows = store.entries()
        assert len(rows) == settled == 50  # the budget was used up, not just refused
        assert total(store) <= 0.5 + EPS
        assert len({row.run_id.split("-")[0] for row in rows}) >= 2  # more than one process won some
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_opens_its_own_connection(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path)
    try:
        scope = day(1.0, start=0, end=math.inf)
        store.settle(reserve(store, [scope], 0.1), entry(0.1, run_id="parent"))
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report, then leave without running the parent's cleanup
            code = 1
            try:
                inherited = store._db._conn
                store.settle(reserve(store, [scope], 0.2), entry(0.2, run_id="child"))
                code = 0 if store._db._conn is not inherited and store._db._pid == os.getpid() else 2
            finally:
                os.write(write, bytes([code]))
                os._exit(0)
        os.close(write)
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read, "rb") as pipe:
            assert pipe.read() == b"\x00"
        assert os.waitstatus_to_exitcode(status) == 0
        store.record(entry(0.3, run_id="parent-after"))  # the parent's connection still works
        assert [row.run_id for row in store.entries()] == ["parent", "child", "parent-after"]
        assert store.left(scope) == pytest.approx(0.4)
    finally:
        store.close()


# --- SQLite only: errors ------------------------------------------------------------------------


def test_a_file_that_is_not_a_database_is_a_store_error_naming_it(tmp_path: Path) -> None:
    db_path(tmp_path).write_bytes(b"this is not a database, it is a text file " * 100)
    with pytest.raises(StoreError, match=str(db_path(tmp_path))):
        SQLiteBudgetStore(tmp_path)


def test_a_database_locked_too_long_is_a_store_error_naming_the_file(tmp_path: Path) -> None:
    store = SQLiteBudgetStore(tmp_path, clock=FakeClock(), busy_timeout_s=0.05)
    blocker = open_db(tmp_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreError, match=r"agentkeel\.db: reserve failed: database is locked") as locked:
            reserve(store, [day(1.0)], 0.1)
        assert "busy_timeout_s" in str(locked.value)
        blocker.execute("ROLLBACK")
        reserve(store, [day(1.0)], 0.1)  # usable again once the lock is gone: the transaction was rolled back
        assert store.left(day(1.0)) == pytest.approx(0.9)
    finally:
        blocker.close()
        store.close()


# --- both: one random history, the same answers ---------------------------------------------------

_POOL = (
    day(0.6, start=T0, end=T0 + 200), day(0.4, user="bob", start=T0, end=T0 + 200),
    day(0.5, start=T0 + 200, end=T0 + 400), session(0.5), session(0.3, session_id="s-2"),
    session(0.3, user="bob"), month(0.9, start=T0, end=T0 + 400), month(0.5, principal="ops", start=T0, end=T0 + 400),
)


def _history(store: BudgetStore, clock: FakeClock, seed: int) -> list[Any]:
    """Apply a random history to ``store``; return what every call answered."""
    rng = random.Random(seed)
    answers: list[Any] = []
    ids: list[str] = []
    for _ in range(300):
        op = rng.choice(["reserve", "reserve", "reserve", "settle", "settle", "release", "record", "advance", "left"])
        if op == "reserve":
            user, session_id = rng.choice(["ann", "bob"]), rng.choice(["s-1", "s-2"])
            mine = [s for s in _POOL if (s.kind == "user_day" and s.user_id == user)
                    or (s.kind == "session" and (s.user_id, s.session_id) == (user, session_id))]
            scopes = rng.sample(mine, rng.randint(0, len(mine)))
            if rng.random() < 0.5:  # at most one principal: a reservation has one owner
                scopes.append(rng.choice([s for s in _POOL if s.kind == "principal_month"]))
            rng.shuffle(scopes)
            try:
                ids.append(store.reserve(scopes, rng.choice([0.0, 0.01, 0.05, 0.1, 0.25]), holder="h",
                                         ttl_s=rng.choice([5.0, 30.0, 300.0])))
                answers.append(("reserved", len(ids) - 1))
            except BudgetExceededError as exc:
                answers.append(("refused", str(exc)))
        elif op in ("settle", "release", "record"):
            row = LedgerEntry(
                run_id=f"r{rng.randint(1, 6)}", user_id=rng.choice(["ann", "bob"]),
                session_id=rng.choice(["s-1", "s-2"]), principal=rng.choice(["support", "ops"]),
                kind=rng.choice(["llm", "tool"]), cost_usd=rng.choice([0.0, 0.01, 0.03, 0.2]),
                tier=rng.choice([None, "fast", "strong"]), input_tokens=rng.randint(0, 99),
                estimated=rng.random() < 0.2,
            )
            which = rng.randrange(len(ids) + 1)
            rid = ids[which] if which < len(ids) else "unknown"
            if op == "settle":
                store.settle(rid, row)
            elif op == "release":
                store.release(rid)
            else:
                store.record(row)
        elif op == "advance":
            clock.advance(rng.choice([0.5, 3.0, 20.0]))
        else:
            answers.append(("left", round(store.left(rng.choice(_POOL)), 9)))
    answers.append(("entries", store.entries()))
    for group in GROUPS:
        answers.append((group, [{**r, "cost_usd": round(r["cost_usd"], 9), "estimated_usd": round(
            r["estimated_usd"], 9)} for r in store.totals(group)]))
    answers.append(("top", [{**r, "cost_usd": round(r["cost_usd"], 9)} for r in store.top_runs(4)]))
    answers.append(("left", [round(store.left(scope), 9) for scope in _POOL]))
    return answers


@pytest.mark.parametrize("seed", range(6))
def test_both_backends_answer_a_random_history_alike(tmp_path: Path, seed: int) -> None:
    memory_clock, sqlite_clock = FakeClock(), FakeClock()
    memory = MemoryBudgetStore(clock=memory_clock)
    sqlite = SQLiteBudgetStore(tmp_path, clock=sqlite_clock)
    try:
        expected = _history(memory, memory_clock, seed)
        got = _history(sqlite, sqlite_clock, seed)
    finally:
        memory.close()
        sqlite.close()
    assert sum(1 for a in expected if a[0] == "refused") > 5  # the history exercises refusals
    assert sum(1 for a in expected if a[0] == "reserved") > 5
    assert len(expected[-1 - len(GROUPS) - 2][1]) > 10  # and writes rows
    for want, have in zip(expected, got, strict=True):
        assert have == want
