"""PostgreSQL tables of the ledger (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = (
    """
    CREATE TABLE ledger (
        id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts               DOUBLE PRECISION NOT NULL,
        run_id           TEXT NOT NULL,
        step_id          BIGINT,
        user_id          TEXT NOT NULL,
        session_id       TEXT NOT NULL,
        principal        TEXT NOT NULL,
        kind             TEXT NOT NULL,
        purpose          TEXT NOT NULL DEFAULT '',
        reason           TEXT NOT NULL DEFAULT '',
        model            TEXT,
        tier             TEXT,
        tool             TEXT,
        input_tokens     BIGINT NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
        output_tokens    BIGINT NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
        cached_tokens    BIGINT NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
        reasoning_tokens BIGINT NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
        cost_usd         DOUBLE PRECISION NOT NULL CHECK (cost_usd >= 0),
        estimated        BOOLEAN NOT NULL DEFAULT false,
        reservation_id   TEXT UNIQUE
    )
    """,
    # The scope sums (cost_usd included: they read the index alone, not the rows).
    "CREATE INDEX ledger_by_user_ts ON ledger (user_id, ts) INCLUDE (cost_usd)",
    "CREATE INDEX ledger_by_session ON ledger (user_id, session_id, ts) INCLUDE (cost_usd)",
    "CREATE INDEX ledger_by_principal_ts ON ledger (principal, ts) INCLUDE (cost_usd)",
    # run_costs and entries(run_id=...); entries/totals/top_runs over a time range, oldest first.
    "CREATE INDEX ledger_by_run ON ledger (run_id, ts)",
    "CREATE INDEX ledger_by_ts ON ledger (ts, id)",
    """
    CREATE TABLE budget_reservations (
        id         TEXT PRIMARY KEY,
        user_id    TEXT NOT NULL,
        session_id TEXT NOT NULL,
        principal  TEXT NOT NULL,
        amount_usd DOUBLE PRECISION NOT NULL CHECK (amount_usd >= 0),
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        holder     TEXT NOT NULL DEFAULT ''
    )
    """,
    "CREATE INDEX budget_reservations_by_expiry ON budget_reservations (expires_at)",
    "CREATE INDEX budget_reservations_by_user ON budget_reservations (user_id, session_id, created_at)",
    "CREATE INDEX budget_reservations_by_principal ON budget_reservations (principal, created_at)",
)
"""Version 1 of the ledger's tables: the columns of SQLite's ``ledger`` and
``budget_reservations`` (``REAL`` as ``DOUBLE PRECISION``: the same 8-byte floats;
``INTEGER`` as ``BIGINT``; ``estimated`` as ``BOOLEAN``; ``id`` an identity, the order of
insertion that SQLite's ``INTEGER PRIMARY KEY`` gives). ``reservation_id`` is ``UNIQUE``
(NULLs, the rows ``record`` writes, never collide): a reservation settles into one row."""
