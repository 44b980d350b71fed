"""The default journal: SQLite under ``$AGENTKEEL_HOME``, or in memory.

``[journal] backend = "memory"`` keeps runs in the process only (no resume
after a crash; for tests and benchmarks). ``synchronous = "full"`` makes every
journal write survive a power cut, at a cost per step.
"""

from __future__ import annotations

from agentkeel.config import Config
from agentkeel.journal.base import Journal
from agentkeel.markers import hookimpl


@hookimpl(trylast=True)
def agentkeel_open_journal(config: Config) -> Journal:
    section = config.section("journal")
    if section.get("backend", "sqlite") == "memory":
        from agentkeel.journal.memory import MemoryJournal

        return MemoryJournal()
    from agentkeel.journal.sqlite import SQLiteJournal

    return SQLiteJournal(config.home, synchronous=section.get("synchronous", "normal"))
