"""Cost of the budget store on the priced-call path: reserve + settle, and ``left()``.

Every priced call (an LLM completion, a priced tool) does one ``reserve`` of its
worst case against every budget scope that applies, then one ``settle`` that
replaces the reservation with its ledger row. This measures that pair, in µs per
call, against 1 scope (a user's day) and 3 scopes (session, user's day,
principal's month), for:

- ``sqlite``: ``SQLiteBudgetStore`` on a fresh ``<tmp>/agentkeel.db`` (WAL,
  ``synchronous = NORMAL``, as ``open_db`` sets it and the journal uses it): one
  ``BEGIN IMMEDIATE`` transaction per reserve and one per settle, each committed;
- ``memory``: ``MemoryBudgetStore`` (one lock, nothing durable).

Then the cost of ``left(scope)`` (what the planner checks before it starts) on the
ledger the run above left behind. Each figure is the median over ``--iterations``
calls (after a short warm-up), with the 90th percentile beside it. The ledger
grows by one row per call, so the last calls sum more rows than the first;
``--prefill N`` writes N rows into every scope's window first, to see how the
sums scale with a busy user or principal (a month of a principal's calls).

    python bench/ledger.py [--iterations 3000] [--prefill 0]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from agentkeel.cost.memory_store import MemoryBudgetStore
from agentkeel.cost.sqlite_store import SQLiteBudgetStore
from agentkeel.cost.store import BudgetStore, LedgerEntry, ScopeLimit

WARMUP = 50


def scopes(now: float) -> tuple[ScopeLimit, ScopeLimit, ScopeLimit]:
    day = ScopeLimit("user_day", 1e9, "per_user_daily_usd of user 'ann'", user_id="ann",
                     start=now - 43200, end=now + 43200)
    session = ScopeLimit("session", 1e9, "per_session_usd of session 's-1' of user 'ann'", user_id="ann",
                         session_id="s-1")
    month = ScopeLimit("principal_month", 1e9, "per_principal_monthly_usd of principal 'support'",
                       principal="support", start=now - 15 * 86400, end=now + 15 * 86400)
    return day, session, month


ENTRY = LedgerEntry(run_id="run-1", user_id="ann", session_id="s-1", principal="support", kind="llm",
                    cost_usd=0.0012, purpose="plan", reason="first_tier", model="gpt-4o-mini", tier="fast",
                    input_tokens=812, output_tokens=96)


def timed(fn: Callable[[], object], iterations: int) -> tuple[float, float]:
    """Median and 90th percentile of ``fn()`` in µs."""
    for _ in range(WARMUP):
        fn()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9)]


def reserve_settle(store: BudgetStore, against: Sequence[ScopeLimit]) -> Callable[[], None]:
    def call() -> None:
        rid = store.reserve(against, 0.002, holder="bench", ttl_s=600.0)
        store.settle(rid, ENTRY)

    return call


def bench(name: str, open_store: Callable[[], BudgetStore], iterations: int, prefill: int) -> None:
    day, session, month = scopes(time.time())
    for label, against in (("1 scope ", [day]), ("3 scopes", [session, day, month])):
        store = open_store()
        try:
            for _ in range(prefill):
                store.record(ENTRY)
            median, p90 = timed(reserve_settle(store, against), iterations)
            print(f"  {name:<6} reserve+settle, {label}: {median:8.1f} µs median  ({p90:8.1f} p90)")
            if len(against) == 3:
                median, p90 = timed(functools.partial(store.left, month), iterations)
                rows = len(store.entries())
                print(f"  {name:<6} left(month scope), {rows} rows: {median:8.1f} µs median  ({p90:8.1f} p90)")
        finally:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--prefill", type=int, default=0, help="ledger rows written into every window first")
    args = parser.parse_args()
    print(f"budget store, {args.iterations} iterations, {args.prefill} rows prefilled "
          f"(Python {sys.version.split()[0]}):")
    with tempfile.TemporaryDirectory() as tmp:
        homes = iter(range(1_000))
        bench("sqlite", lambda: SQLiteBudgetStore(Path(tmp) / f"home-{next(homes)}"), args.iterations, args.prefill)
    bench("memory", MemoryBudgetStore, args.iterations, args.prefill)


if __name__ == "__main__":
    main()
