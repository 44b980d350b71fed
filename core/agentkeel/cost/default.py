"""The default budget store: the cost ledger and scoped budgets in ``<home>/agentkeel.db``.

With ``[store] url`` (or ``url_env``) set, they live in that PostgreSQL database instead
(``agentkeel.cost.pg_store.PostgresBudgetStore``), shared by every replica. Otherwise,
with ``[journal] backend = "memory"`` (tests, benchmarks) they are kept in the process,
like the journal.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.cost.store import BudgetStore
from agentkeel.markers import hookimpl


@hookimpl(trylast=True)
def agentkeel_open_budget_store(config: Config) -> BudgetStore:
    from agentkeel.pg import store_url

    url = store_url(config)
    if url is not None:
        from agentkeel.cost.pg_store import PostgresBudgetStore

        return PostgresBudgetStore(url)
    if config.section("journal").get("backend", "sqlite") == "memory":
        from agentkeel.cost.memory_store import MemoryBudgetStore

        return MemoryBudgetStore()
    from agentkeel.cost.sqlite_store import SQLiteBudgetStore

    return SQLiteBudgetStore(config.home)
