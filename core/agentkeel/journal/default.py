"""The default journal: SQLite under ``$AGENTKEEL_HOME``, in memory, or PostgreSQL.

With ``[store] url`` (or ``url_env``) set, runs live in that PostgreSQL database
(``agentkeel.journal.pg.PostgresJournal``), shared and fenced across every replica;
``psycopg`` is imported only then. Otherwise ``[journal] backend = "memory"`` keeps
runs in the process only (no resume after a crash; for tests and benchmarks), and
the default is SQLite, where ``synchronous = "full"`` makes every journal write
survive a power cut, at a cost per step.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.journal.base import Journal
from agentkeel.markers import hookimpl


@hookimpl(trylast=True)
def agentkeel_open_journal(config: Config) -> Journal:
    from agentkeel.pg import store_url

    url = store_url(config)
    if url is not None:
        from agentkeel.journal.pg import PostgresJournal

        return PostgresJournal(url)
    section = config.section("journal")
    if section.get("backend", "sqlite") == "memory":
        from agentkeel.journal.memory import MemoryJournal

        return MemoryJournal()
    from agentkeel.journal.sqlite import SQLiteJournal

    return SQLiteJournal(config.home, synchronous=section.get("synchronous", "normal"))
