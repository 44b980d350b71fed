"""PostgreSQL tables of the audit (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = (
    """
    CREATE TABLE audit_heads (
        chain_id    TEXT PRIMARY KEY,
        host        TEXT NOT NULL,
        log_path    TEXT NOT NULL,
        count       BIGINT NOT NULL,
        head        TEXT NOT NULL,
        size        BIGINT,
        updated_at  DOUBLE PRECISION NOT NULL,
        anchored_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        broken      TEXT
    )
    """,
)
"""Version 1 of the audit's tables: ``audit_heads``, one row per hash-chained audit log
(one per replica's home), the anchor of ``agentkeel.permissions.audit_pg.PostgresAnchor``.
``chain_id`` is ``<host>:<absolute log path>``; ``count``, ``head`` and ``size`` (the byte
offset where record ``count`` ends) are those of the newest anchored record, ``updated_at``
its time (the record's ``ts``), ``anchored_at`` the server's time of the last UPSERT, and
``broken`` what a writer found when the log no longer continued the anchored chain."""
