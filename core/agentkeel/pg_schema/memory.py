"""PostgreSQL tables of the memory (see ``agentkeel.pg_schema``)."""

from __future__ import annotations

V1: tuple[str, ...] = (
    """
    CREATE TABLE memory_turns (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    TEXT NOT NULL,
        session_id TEXT NOT NULL,
        run_id     TEXT NOT NULL,
        role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
        content    TEXT NOT NULL,
        status     TEXT NOT NULL DEFAULT '',
        ts         DOUBLE PRECISION NOT NULL
    )
    """,
    "CREATE INDEX memory_turns_by_session ON memory_turns (user_id, session_id, id)",
    "CREATE INDEX memory_turns_by_user_ts ON memory_turns (user_id, ts)",
    """
    CREATE TABLE memory_summaries (
        user_id      TEXT NOT NULL,
        session_id   TEXT NOT NULL,
        text         TEXT NOT NULL,
        upto_turn_id BIGINT NOT NULL,
        run_id       TEXT NOT NULL DEFAULT '',
        source       TEXT NOT NULL DEFAULT 'extractive',
        ts           DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (user_id, session_id)
    )
    """,
    """
    CREATE TABLE memory_records (
        id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        user_id    TEXT NOT NULL,
        session_id TEXT NOT NULL,
        run_id     TEXT NOT NULL,
        text       TEXT NOT NULL,
        ts         DOUBLE PRECISION NOT NULL,
        terms      TEXT NOT NULL,
        length     INTEGER NOT NULL,
        tsv        TSVECTOR GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, terms)) STORED
    )
    """,
    "CREATE INDEX memory_records_by_user ON memory_records (user_id, id)",
    "CREATE INDEX memory_records_by_user_ts ON memory_records (user_id, ts)",
    "CREATE INDEX memory_records_fts ON memory_records USING GIN (tsv)",
    """
    CREATE TABLE memory_profile (
        user_id TEXT NOT NULL,
        key     TEXT NOT NULL,
        value   TEXT NOT NULL,
        run_id  TEXT NOT NULL DEFAULT '',
        ts      DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (user_id, key)
    )
    """,
    """
    CREATE TABLE memory_vectors (
        id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        record_id BIGINT NOT NULL REFERENCES memory_records (id) ON DELETE CASCADE,
        user_id   TEXT NOT NULL,
        run_id    TEXT NOT NULL,
        model     TEXT NOT NULL,
        dims      INTEGER NOT NULL,
        vector    BYTEA NOT NULL,
        UNIQUE (record_id, model)
    )
    """,
    "CREATE INDEX memory_vectors_by_user ON memory_vectors (user_id, model, dims, id)",
)
"""Version 1 of the memory's tables: SQLite's ``memory_turns``, ``memory_summaries``,
``memory_records``, ``memory_profile`` and ``memory_vectors`` (``REAL`` as ``DOUBLE
PRECISION``, ids as ``BIGINT`` identities: they only grow and are never reused).

Full text: ``memory_records.terms`` is the record's words as ``agentkeel.memory.store.words``
finds them (lower-cased ``\\w+`` runs, joined by spaces), written with the record;
``tsv`` is generated from it (``to_tsvector('simple', terms)``) and GIN-indexed, so the
index is the row's and goes with it. Indexing the words rather than the raw text makes
PostgreSQL's parser see the same tokens the query's terms are (an e-mail address or a
URL is not one opaque token). ``length`` is the number of words (BM25's document length).

Vectors: the little-endian float32 bytes of the unit vector, as in SQLite (no pgvector:
the extension may be missing, and a fixed migration cannot depend on it). The foreign
key deletes a record's vectors with it even when a vector is written while the record
is being forgotten."""
