"""The embedded SQLite store: one file, ``<home>/agentkeel.db``, shared by every component.

``open_db(home)`` returns a connection in autocommit mode (``isolation_level=None``;
use ``BEGIN``/``COMMIT`` or single statements), with WAL journaling, a busy
timeout, and the schema brought up to date.

Schema changes are one linear history, ``MIGRATIONS``, tracked by SQLite's
``PRAGMA user_version``: migration N moves the file from version N-1 to N.
A component that needs tables (the memory manager, the journal, ...) appends a
migration at the end; migrations already released are never edited. Migrating is
done inside ``BEGIN IMMEDIATE``, so processes opening the file at the same time
apply each migration exactly once.

``ConnectionCache`` keeps one connection per database path per process, so a
component can open lazily and still follow ``$AGENTKEEL_HOME`` when it changes
(between tests, or for two systems in one process).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import attrs

from agentkeel.errors import StoreError

DB_FILENAME = "agentkeel.db"
DEFAULT_BUSY_TIMEOUT_S = 5.0



@attrs.frozen
class Migration:
    """One step of the schema: ``statements`` take the file from ``version - 1`` to ``version``."""

    version: int
    component: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "memory",
        (
            """
            CREATE TABLE memory_turns (
                id         INTEGER PRIMARY KEY AUTOINCREMENT,
                user_id    TEXT NOT NULL,
                session_id TEXT NOT NULL,
                run_id     TEXT NOT NULL,
                role       TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
                content    TEXT NOT NULL,
                status     TEXT,
                ts         REAL NOT NULL
            )
            """,
            "CREATE INDEX memory_turns_by_session ON memory_turns (user_id, session_id, id)",
        ),
    ),
    Migration(
        2,
        "journal",
        (
            """
            CREATE TABLE runs (
                run_id           TEXT PRIMARY KEY,
                user_id          TEXT NOT NULL,
                session_id       TEXT NOT NULL,
                message          TEXT NOT NULL,
                principal        TEXT NOT NULL,
                budget_usd       REAL,
                plan             TEXT NOT NULL,
                status           TEXT NOT NULL,
                detail           TEXT NOT NULL DEFAULT '',
                created_at       REAL NOT NULL,
                updated_at       REAL NOT NULL,
                owner            TEXT NOT NULL DEFAULT '',
                epoch            INTEGER NOT NULL,
                lease_expires_at REAL NOT NULL DEFAULT 0
            )
            """,
            "CREATE INDEX runs_by_created ON runs (created_at)",
            """
            CREATE TABLE steps (
                seq             INTEGER PRIMARY KEY,
                run_id          TEXT NOT NULL REFERENCES runs (run_id),
                step_id         INTEGER NOT NULL,
                kind            TEXT NOT NULL CHECK (kind IN ('forward', 'compensation')),
                phase           TEXT NOT NULL CHECK (phase IN ('intent', 'outcome')),
                tool_name       TEXT NOT NULL,
                args            TEXT NOT NULL,
                idempotency_key TEXT,
                status          TEXT,
                result          TEXT,
                error           TEXT,
                duration_s      REAL NOT NULL DEFAULT 0,
                cost_usd        REAL NOT NULL DEFAULT 0,
                attempts        INTEGER NOT NULL DEFAULT 0,
                verdict         TEXT,
                ts              REAL NOT NULL
            )
            """,
            "CREATE INDEX steps_by_run ON steps (run_id, seq)",
        ),
    ),
    Migration(
        3,
        "journal",
        (
            "ALTER TABLE runs ADD COLUMN planning_cost_usd REAL NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD COLUMN then_status TEXT NOT NULL DEFAULT ''",
        ),
    ),
    Migration(
        4,
        "journal",
        (
            "ALTER TABLE runs ADD COLUMN answer TEXT NOT NULL DEFAULT ''",
            # Runs journaled before this migration have no rows here; the journal
            # reads their runs.plan as revision 1 (and writes it before a revision 2).
            """
            CREATE TABLE plan_revisions (
                run_id            TEXT NOT NULL REFERENCES runs (run_id),
                revision          INTEGER NOT NULL,
                reason            TEXT NOT NULL,
                plan              TEXT NOT NULL,
                planning_cost_usd REAL NOT NULL DEFAULT 0,
                ts                REAL NOT NULL,
                PRIMARY KEY (run_id, revision)
            )
            """,
            """
            CREATE TABLE approvals (
                run_id       TEXT NOT NULL REFERENCES runs (run_id),
                step_id      INTEGER NOT NULL,
                tool_name    TEXT NOT NULL,
                args         TEXT NOT NULL,
                requested_by TEXT NOT NULL,
                requested_at REAL NOT NULL,
                expires_at   REAL NOT NULL,
                status       TEXT NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'approved', 'denied', 'expired')),
                decided_by   TEXT NOT NULL DEFAULT '',
                decided_at   REAL NOT NULL DEFAULT 0,
                reason       TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (run_id, step_id)
            )
            """,
            "CREATE INDEX approvals_by_status ON approvals (status, requested_at)",
        ),
    ),
    Migration(
        5,
        "cost",
        (
            # One row per priced event; reservation_id links a settled row to the
            # reservation it replaced (UNIQUE: settling twice writes one row; NULL for
            # money recorded without a reservation, and NULLs never collide).
            """
            CREATE TABLE ledger (
                id               INTEGER PRIMARY KEY,
                ts               REAL NOT NULL,
                run_id           TEXT NOT NULL,
                step_id          INTEGER,
                user_id          TEXT NOT NULL,
                session_id       TEXT NOT NULL,
                principal        TEXT NOT NULL,
                kind             TEXT NOT NULL,
                purpose          TEXT NOT NULL DEFAULT '',
                reason           TEXT NOT NULL DEFAULT '',
                model            TEXT,
                tier             TEXT,
                tool             TEXT,
                input_tokens     INTEGER NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
                output_tokens    INTEGER NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
                cached_tokens    INTEGER NOT NULL DEFAULT 0 CHECK (cached_tokens >= 0),
                reasoning_tokens INTEGER NOT NULL DEFAULT 0 CHECK (reasoning_tokens >= 0),
                cost_usd         REAL NOT NULL CHECK (cost_usd >= 0),
                estimated        INTEGER NOT NULL DEFAULT 0 CHECK (estimated IN (0, 1)),
                reservation_id   TEXT UNIQUE
            )
            """,
            # cost_usd in the index: a scope's sum reads the index alone, not the rows
            "CREATE INDEX ledger_by_user_ts ON ledger (user_id, ts, cost_usd)",
            "CREATE INDEX ledger_by_session ON ledger (user_id, session_id, cost_usd)",
            "CREATE INDEX ledger_by_principal_ts ON ledger (principal, ts, cost_usd)",
            "CREATE INDEX ledger_by_run ON ledger (run_id)",
            """
            CREATE TABLE budget_reservations (
                id         TEXT PRIMARY KEY,
                user_id    TEXT NOT NULL,
                session_id TEXT NOT NULL,
                principal  TEXT NOT NULL,
                amount_usd REAL NOT NULL CHECK (amount_usd >= 0),
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                holder     TEXT NOT NULL DEFAULT ''
            )
            """,
            "CREATE INDEX budget_reservations_by_expiry ON budget_reservations (expires_at)",
        ),
    ),
    Migration(
        6,
        "memory",
        (
            "CREATE INDEX memory_turns_by_user_ts ON memory_turns (user_id, ts)",
            """
            CREATE TABLE memory_summaries (
                user_id      TEXT NOT NULL,
                session_id   TEXT NOT NULL,
                text         TEXT NOT NULL,
                upto_turn_id INTEGER NOT NULL,
                run_id       TEXT NOT NULL DEFAULT '',
                source       TEXT NOT NULL DEFAULT 'extractive',
                ts           REAL NOT NULL,
                PRIMARY KEY (user_id, session_id)
            )
            """,
            """
            CREATE TABLE memory_records (
                id         INTEGER PRIMARY KEY,
                user_id    TEXT NOT NULL,
                session_id TEXT NOT NULL,
                run_id     TEXT NOT NULL,
                text       TEXT NOT NULL,
                ts         REAL NOT NULL
            )
            """,
            "CREATE INDEX memory_records_by_user ON memory_records (user_id, id)",
            "CREATE INDEX memory_records_by_user_ts ON memory_records (user_id, ts)",
            # rowid = memory_records.id. owner is one token per user (a hash of the user id), indexed,
            # so a search intersects the user's rows with the terms' inside the index instead of
            # ranking every user's matches and filtering them afterwards.
            "CREATE VIRTUAL TABLE memory_records_fts USING fts5(text, owner, tokenize='unicode61')",
            # how many records hold each term: a search leaves out terms that most records hold
            "CREATE VIRTUAL TABLE memory_records_vocab USING fts5vocab(memory_records_fts, 'row')",
            """
            CREATE TABLE memory_profile (
                user_id TEXT NOT NULL,
                key     TEXT NOT NULL,
                value   TEXT NOT NULL,
                run_id  TEXT NOT NULL DEFAULT '',
                ts      REAL NOT NULL,
                PRIMARY KEY (user_id, key)
            )
            """,
        ),
    ),
    Migration(
        7,
        "journal",
        # what memory put in the run's prompts and left out (ContextReport.to_dict(), JSON; "" for none)
        ("ALTER TABLE runs ADD COLUMN context TEXT NOT NULL DEFAULT ''",),
    ),
    Migration(
        8,
        "memory",
        (
            # One vector per (record, model): the unit-length float32 bytes of the record's embedding.
            # id only grows (AUTOINCREMENT: never reused), so (count, max id) of a user's vectors
            # changes whenever one is added or deleted (what the in-process matrix cache checks).
            """
            CREATE TABLE memory_vectors (
                id        INTEGER PRIMARY KEY AUTOINCREMENT,
                record_id INTEGER NOT NULL,
                user_id   TEXT NOT NULL,
                run_id    TEXT NOT NULL,
                model     TEXT NOT NULL,
                dims      INTEGER NOT NULL,
                vector    BLOB NOT NULL,
                UNIQUE (record_id, model)
            )
            """,
            "CREATE INDEX memory_vectors_by_user ON memory_vectors (user_id, model, dims, id)",
        ),
    ),
    Migration(
        9,
        "keys",
        (
            # API keys of the HTTP service. token_hash is the SHA-256 (hex) of the secret's token:
            # the secret itself is never stored. NULL expires_at: never expires; NULL revoked_at:
            # not revoked; NULL rate_limit: no limit of the key's own.
            """
            CREATE TABLE api_keys (
                key_id       TEXT PRIMARY KEY,
                principal    TEXT NOT NULL,
                name         TEXT NOT NULL DEFAULT '',
                token_hash   TEXT NOT NULL,
                created_at   REAL NOT NULL,
                expires_at   REAL,
                revoked_at   REAL,
                rate_limit   REAL,
                last_used_at REAL
            )
            """,
            "CREATE INDEX api_keys_by_principal ON api_keys (principal, created_at)",
        ),
    ),
)


def _wal(conn: sqlite3.Connection, busy_timeout_s: float) -> str:
    """Switch to WAL journaling. While another process creates the file, SQLite reports
    "locked" at once for this pragma (the busy timeout does not apply to it): try again
    until the busy timeout has passed."""
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def db_path(home: str | os.PathLike[str]) -> Path:
    """Where the store lives under ``home``."""
    return Path(home) / DB_FILENAME


def open_db(
    home: str | os.PathLike[str],
    *,
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> sqlite3.Connection:
    """Open ``<home>/agentkeel.db`` (creating ``home`` and the file if needed) and migrate it.

    The connection may be used from any thread (``check_same_thread=False``);
    callers that share it between threads must serialise their use of it.
    Raises ``sqlite3.Error`` or ``OSError`` when the file cannot be opened or is
    not a database, and ``StoreError`` when its schema is newer than this code.
    """
    _check_migrations(migrations)
    path = db_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = _wal(conn, busy_timeout_s)
        if str(mode).lower() != "wal":
            raise StoreError(
                f"{path}: SQLite refused WAL journaling (mode is {mode!r}); put the file on a local disk"
            )
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn, migrations, label=str(path))
    except BaseException:
        conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration] = MIGRATIONS,
    *,
    label: str = "database",
) -> int:
    """Apply the migrations the database lacks; return the resulting version.

    Safe against concurrent openers: the version is re-read under a write lock.
    """
    _check_migrations(migrations)
    latest = len(migrations)
    if schema_version(conn) == latest:
        return latest
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = schema_version(conn)
        if current > latest:
            raise StoreError(
                f"{label} has schema version {current}, newer than this agentkeel knows ({latest}); "
                "upgrade agentkeel, or point AGENTKEEL_HOME at another directory"
            )
        for migration in migrations[current:]:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {migration.version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return latest


def _check_migrations(migrations: Sequence[Migration]) -> None:
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise StoreError(
                f"migration list is broken: entry {expected} ({migration.component}) has version "
                f"{migration.version}; versions must run 1, 2, 3... with no gaps"
            )


class ConnectionCache:
    """One connection per database path, per process, opened on first use.

    ``get`` reopens after ``discard`` or ``close_all``, and after a fork (a
    child never uses its parent's connections). Thread-safe.
    """

    def __init__(self, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conns: dict[Path, sqlite3.Connection] = {}
        self._pid = os.getpid()

    @staticmethod
    def key(home: str | os.PathLike[str]) -> Path:
        return db_path(Path(home).expanduser().resolve())

    def get(self, home: str | os.PathLike[str]) -> sqlite3.Connection:
        """The connection for ``home``; raises like ``open_db`` when it cannot be opened."""
        key = self.key(home)
        with self._lock:
            if self._pid != os.getpid():
                self._conns = {}  # inherited from the parent: leave them alone
                self._pid = os.getpid()
            conn = self._conns.get(key)
            if conn is None:
                conn = open_db(key.parent, busy_timeout_s=self._busy_timeout_s)
                self._conns[key] = conn
            return conn

    def discard(self, home: str | os.PathLike[str]) -> None:
        """Close and forget the connection for ``home`` (the next ``get`` reopens)."""
        with self._lock:
            conn = self._conns.pop(self.key(home), None)
        if conn is not None:
            _close_quietly(conn)

    def close_all(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
            mine = self._pid == os.getpid()
        if mine:
            for conn in conns:
                _close_quietly(conn)

    def __len__(self) -> int:
        return len(self._conns)


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


_T = TypeVar("_T")


class ProcessConnection:
    """A store's connection to ``<home>/agentkeel.db``: one per process (a forked child
    opens its own on first use), used under one lock, so a store is safe across threads
    and processes. Opened at once, so an unusable file fails when the store is made.

    ``name`` says which store it is in errors ("journal", "budget store"); ``on_open``
    runs on each new connection (a pragma). SQLite errors become ``StoreError`` naming
    the store, the file and what failed.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        name: str,
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        on_open: Callable[[sqlite3.Connection], object] | None = None,
        closed_hint: str = "",
    ) -> None:
        self.home = Path(home)
        self.path = db_path(self.home)
        self.name = name
        self.busy_timeout_s = busy_timeout_s
        self._on_open = on_open
        self._closed_hint = closed_hint
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._closed = False
        with self._lock:
            self._connection()

    def _connection(self) -> sqlite3.Connection:
        """This process's connection; call with the lock held."""
        if self._closed:
            raise StoreError(f"{self.name} {self.path} is closed{self._closed_hint}")
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            try:
                conn = open_db(self.home, busy_timeout_s=self.busy_timeout_s)
                if self._on_open is not None:
                    self._on_open(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open the {self.name} {self.path}: {exc}") from exc
            self._conn, self._pid = conn, pid
        return self._conn

    def run(self, what: str, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """``fn(conn)`` with the lock held; an SQLite error rolls back and becomes ``StoreError``."""
        with self._lock:
            conn = self._connection()
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StoreError(
                    f"{self.name} {self.path}: {what} failed: {exc}; if the database is locked, "
                    "another process holds it too long (raise busy_timeout_s)"
                ) from exc

    def close(self) -> None:
        """Close this process's connection; using the store afterwards raises ``StoreError``. Idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            self._closed = True
        if conn is not None and self._pid == os.getpid():
            try:
                conn.close()
            except sqlite3.Error:
                pass


def atomic(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T]) -> _T:
    """``fn(conn)`` inside ``BEGIN IMMEDIATE`` (the write lock taken before the first read):
    committed when it returns (unless it committed itself), rolled back when it raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
        if conn.in_transaction:
            conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
