"""The default budget store: the cost ledger and scoped budgets in ``<home>/agentkeel.db``.

With ``[journal] backend = "memory"`` (tests, benchmarks) they are kept in the
process instead, like the journal.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.cost.store import BudgetStore
from agentkeel.markers import hookimpl


@hookimpl(trylast=True)
def agentkeel_open_budget_store(config: Config) -> BudgetStore:
    if config.section("journal").get("backend", "sqlite") == "memory":
        from agentkeel.cost.memory_store import MemoryBudgetStore

        return MemoryBudgetStore()
    from agentkeel.cost.sqlite_store import SQLiteBudgetStore

    return SQLiteBudgetStore(config.home)
