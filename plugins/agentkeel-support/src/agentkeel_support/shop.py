"""The shop database behind the support tools: one SQLite file.

Where it lives: ``$AGENTKEEL_SHOP_DB`` when set, else ``shop.db`` in
``$AGENTKEEL_HOME``, else in the platform's user data directory for agentkeel.

Promises:

- The file and its parent directory are created on first use, with the schema
  and the sample data (``SAMPLE_ORDERS``, ``SAMPLE_PRODUCTS``). Creation runs
  inside ``BEGIN IMMEDIATE`` and is recorded in ``PRAGMA user_version``, so two
  processes creating the file at once seed it exactly once.
- The schema is at version ``SCHEMA_VERSION`` (2). A database of an older
  version is migrated in place, in the same kind of transaction, by the steps
  of ``MIGRATIONS`` (version 1 to 2 adds the ``tickets`` table); its data is
  kept, never re-seeded. A newer version than this code knows is refused.
- ``connect()`` opens a fresh connection per call (tools may run on worker
  threads, in subprocesses or containers, so nothing is shared), in autocommit
  mode with WAL journaling and a busy timeout; ``transaction()`` wraps the few
  statements of one tool call in a short ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import platformdirs
from agentkeel.errors import ToolError

SHOP_DB_ENV: Final = "AGENTKEEL_SHOP_DB"
LATENCY_ENV: Final = "AGENTKEEL_SHOP_LATENCY_S"
HOME_ENV: Final = "AGENTKEEL_HOME"
SHOP_DB_FILENAME: Final = "shop.db"
BUSY_TIMEOUT_S: Final = 10.0
SCHEMA_VERSION: Final = 2

ORDER_STATUSES: Final = ("pending", "shipped", "delivered", "cancelled")
REFUND_STATUSES: Final = ("issued", "cancelled")
TICKET_STATUSES: Final = ("open", "closed")

# order_id, customer_email, product_id, total, status
SAMPLE_ORDERS: Final[tuple[tuple[str, str, str, float, str], ...]] = (
    ("1001", "alice@example.com", "widget-1", 49.99, "shipped"),
    ("1002", "bob@example.com", "gadget-2", 19.50, "pending"),
    ("1003", "carol@example.com", "widget-1", 120.00, "delivered"),
    ("1004", "dave@example.com", "gizmo-3", 35.00, "cancelled"),
    ("ORD-123", "erin@example.com", "widget-1", 49.99, "shipped"),
    # A customer whose mailbox bounces: "refund order 1005 and email the customer"
    # fails at its last step, which shows the refund being rolled back.
    ("1005", "frank@mail.invalid", "gadget-2", 19.50, "shipped"),
)
# product_id, name, stock
SAMPLE_PRODUCTS: Final[tuple[tuple[str, str, int], ...]] = (
    ("widget-1", "Widget", 42),
    ("gadget-2", "Gadget", 0),
    ("gizmo-3", "Gizmo", 7),
)

# Version 1 exactly as it shipped: never edit it (databases of version 1 have this
# schema); a change is a new step in MIGRATIONS.
SCHEMA_V1: Final = (
    """
    CREATE TABLE products (
        product_id TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        stock      INTEGER NOT NULL CHECK (stock >= 0)
    )
    """,
    f"""
    CREATE TABLE orders (
        order_id       TEXT PRIMARY KEY,
        customer_email TEXT NOT NULL,
        product_id     TEXT NOT NULL REFERENCES products (product_id),
        total          REAL NOT NULL CHECK (total >= 0),
        status         TEXT NOT NULL CHECK (status IN {ORDER_STATUSES!r})
    )
    """,
    f"""
    CREATE TABLE refunds (
        refund_id       TEXT PRIMARY KEY,
        order_id        TEXT NOT NULL REFERENCES orders (order_id),
        amount          REAL NOT NULL CHECK (amount > 0),
        idempotency_key TEXT UNIQUE,
        status          TEXT NOT NULL CHECK (status IN {REFUND_STATUSES!r}),
        created_at      TEXT NOT NULL,
        cancelled_at    TEXT
    )
    """,
    "CREATE INDEX refunds_by_order ON refunds (order_id)",
    """
    CREATE TABLE emails (
        email_id        TEXT PRIMARY KEY,
        to_addr         TEXT NOT NULL,
        subject         TEXT NOT NULL,
        body            TEXT NOT NULL,
        idempotency_key TEXT UNIQUE,
        sent_at         TEXT NOT NULL
    )
    """,
)

# MIGRATIONS[v]: the statements that take a database from version v to v + 1.
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    1: (
        f"""
        CREATE TABLE tickets (
            ticket_id       TEXT PRIMARY KEY,
            order_id        TEXT NOT NULL REFERENCES orders (order_id),
            note            TEXT NOT NULL,
            idempotency_key TEXT UNIQUE,
            status          TEXT NOT NULL CHECK (status IN {TICKET_STATUSES!r}),
            created_at      TEXT NOT NULL,
            closed_at       TEXT
        )
        """,
        "CREATE INDEX tickets_by_order ON tickets (order_id)",
    ),
}


def shop_db_path() -> Path:
    """The database file this process uses now (the environment is read on every call)."""
    explicit = os.environ.get(SHOP_DB_ENV)
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get(HOME_ENV)
    base = Path(home).expanduser() if home else Path(platformdirs.user_data_dir("agentkeel"))
    return base / SHOP_DB_FILENAME


def now() -> str:
    """The current UTC time as ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@contextmanager
def connect(path: Path | None = None) -> Iterator[sqlite3.Connection]:
    """A new connection to the shop database (created and seeded if missing), closed on exit.

    ``AGENTKEEL_SHOP_LATENCY_S`` (seconds) makes every call that slow first: a slow shop
    backend, to watch live progress, cancellation or a replica's takeover by hand."""
    latency = os.environ.get(LATENCY_ENV)
    if latency:
        try:
            time.sleep(min(60.0, max(0.0, float(latency))))
        except ValueError:
            raise ToolError(f"{LATENCY_ENV}={latency!r} is not a number of seconds", retryable=False) from None
    db = path if path is not None else shop_db_path()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise ToolError(
            f"cannot open the shop database {db}: {exc}; set {SHOP_DB_ENV} to a writable path",
            retryable=False,
        ) from exc
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        _ensure_schema(conn, db)
        yield conn
    except sqlite3.OperationalError as exc:
        # "database is locked" after the busy timeout is transient: another writer held it too long.
        transient = "locked" in str(exc) or "busy" in str(exc)
        raise ToolError(f"shop database {db}: {exc}", retryable=transient) from exc
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A short write transaction: ``BEGIN IMMEDIATE`` takes the write lock up front,
    so a read-then-write (check a total, then insert a refund) cannot race another writer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _user_version(conn: sqlite3.Connection) -> int:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


def _ensure_schema(conn: sqlite3.Connection, db: Path) -> None:
    version = _user_version(conn)
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise ToolError(
            f"shop database {db} has schema version {version}, newer than this agentkeel-support "
            f"understands ({SCHEMA_VERSION}); upgrade agentkeel-support or set {SHOP_DB_ENV}",
            retryable=False,
        )
    # WAL is a property of the file; it cannot be switched inside a transaction. Switching
    # can report "locked" at once (no busy wait) while another process creates the file.
    for attempt in range(50):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.02)
    with transaction(conn):
        version = _user_version(conn)  # again: another process may have created or migrated it
        if version >= SCHEMA_VERSION:
            return  # done while this one waited for the lock (a newer one is refused next time)
        if version == 0:
            for statement in SCHEMA_V1:
                conn.execute(statement)
            conn.executemany("INSERT INTO products VALUES (?, ?, ?)", SAMPLE_PRODUCTS)
            conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)", SAMPLE_ORDERS)
            version = 1
        for step in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
