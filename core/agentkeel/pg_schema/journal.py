"""PostgreSQL tables of the journal (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        run_id            TEXT PRIMARY KEY,
        user_id           TEXT NOT NULL,
        session_id        TEXT NOT NULL,
        message           TEXT NOT NULL,
        principal         TEXT NOT NULL,
        budget_usd        DOUBLE PRECISION,
        plan              TEXT NOT NULL,
        status            TEXT NOT NULL,
        detail            TEXT NOT NULL DEFAULT '',
        created_at        DOUBLE PRECISION NOT NULL,
        updated_at        DOUBLE PRECISION NOT NULL,
        owner             TEXT NOT NULL DEFAULT '',
        epoch             BIGINT NOT NULL,
        lease_expires_at  DOUBLE PRECISION NOT NULL DEFAULT 0,
        planning_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        then_status       TEXT NOT NULL DEFAULT '',
        answer            TEXT NOT NULL DEFAULT '',
        context           TEXT NOT NULL DEFAULT '',
        seq               BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
    )
    """,
    "CREATE INDEX runs_by_created ON runs (created_at, seq)",
    "CREATE INDEX runs_by_user_created ON runs (user_id, created_at, seq)",
    """
    CREATE TABLE steps (
        seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id          TEXT NOT NULL REFERENCES runs (run_id),
        step_id         BIGINT NOT NULL,
        kind            TEXT NOT NULL CHECK (kind IN ('forward', 'compensation')),
        phase           TEXT NOT NULL CHECK (phase IN ('intent', 'outcome')),
        tool_name       TEXT NOT NULL,
        args            TEXT NOT NULL,
        idempotency_key TEXT,
        status          TEXT,
        result          TEXT,
        error           TEXT,
        duration_s      DOUBLE PRECISION NOT NULL DEFAULT 0,
        cost_usd        DOUBLE PRECISION NOT NULL DEFAULT 0,
        attempts        BIGINT NOT NULL DEFAULT 0,
        verdict         TEXT,
        ts              DOUBLE PRECISION NOT NULL
    )
    """,
    "CREATE INDEX steps_by_run ON steps (run_id, seq)",
    """
    CREATE TABLE plan_revisions (
        run_id            TEXT NOT NULL REFERENCES runs (run_id),
        revision          INTEGER NOT NULL,
        reason            TEXT NOT NULL,
        plan              TEXT NOT NULL,
        planning_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        ts                DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, revision)
    )
    """,
    """
    CREATE TABLE approvals (
        run_id       TEXT NOT NULL REFERENCES runs (run_id),
        step_id      BIGINT NOT NULL,
        tool_name    TEXT NOT NULL,
        args         TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        requested_at DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION NOT NULL,
        status       TEXT NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
        decided_by   TEXT NOT NULL DEFAULT '',
        decided_at   DOUBLE PRECISION NOT NULL DEFAULT 0,
        reason       TEXT NOT NULL DEFAULT '',
        seq          BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        PRIMARY KEY (run_id, step_id)
    )
    """,
    "CREATE INDEX approvals_by_status ON approvals (status, requested_at)",
    "CREATE INDEX approvals_by_requested ON approvals (requested_at, seq)",
)
"""Version 1 of the journal's tables: the SQLite journal's tables as they stand after all
of its migrations (``runs``, ``steps``, ``plan_revisions``, ``approvals``), ``REAL`` as
``DOUBLE PRECISION`` (the same 8-byte floats, so times and costs round-trip exactly) and
SQLite's 64-bit ``INTEGER`` as ``BIGINT`` (epochs, step ids, attempts).

JSON values (plans, args, results, verdicts, memory reports) are stored as the JSON text
the journal encodes and are parsed back by the same decoder as SQLite's, so what ``load``
returns is byte for byte what the SQLite journal returns (``JSONB`` would reorder keys
and normalise numbers). ``context`` is ``''`` when a run has no memory report.

``seq`` is the order of insertion that SQLite's ``rowid`` (and ``steps.seq``) gives: step
records are read in it, and of two runs or approvals made at the same time the later
comes first in a listing."""
