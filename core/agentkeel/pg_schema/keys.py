"""PostgreSQL tables of the keys (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = (
    """
    CREATE TABLE api_keys (
        key_id       TEXT PRIMARY KEY,
        principal    TEXT NOT NULL,
        name         TEXT NOT NULL DEFAULT '',
        token_hash   TEXT NOT NULL,
        created_at   DOUBLE PRECISION NOT NULL,
        expires_at   DOUBLE PRECISION,
        revoked_at   DOUBLE PRECISION,
        rate_limit   DOUBLE PRECISION,
        last_used_at DOUBLE PRECISION,
        seq          BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE
    )
    """,
    "CREATE INDEX api_keys_by_principal ON api_keys (principal, created_at)",
)
"""Version 1 of the keys's tables: the columns of SQLite's ``api_keys`` (``REAL`` as
``DOUBLE PRECISION``: the same 8-byte floats), plus ``seq``, the order of insertion that
SQLite's ``rowid`` gives (``list`` puts the later of two keys created at once first)."""
