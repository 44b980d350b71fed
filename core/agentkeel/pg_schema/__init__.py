"""The PostgreSQL schema history: one module of statements per component, applied in this
fixed order by ``agentkeel.pg.migrate`` (version N is the N-th entry). A change to a
component's tables is a new entry at the end, never an edit of an applied one."""

from __future__ import annotations

from agentkeel.pg_schema import audit, journal, keys, ledger, memory

HISTORY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("journal", journal.V1),
    ("ledger", ledger.V1),
    ("keys", keys.V1),
    ("memory", memory.V1),
    ("audit", audit.V1),
)
"""(component, statements) of versions 1, 2, 3..."""
