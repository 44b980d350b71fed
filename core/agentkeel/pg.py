"""PostgreSQL for the stores that replicas share: one connection pool per URL and process,
and one versioned schema history (``PG_MIGRATIONS``) applied on start-up.

Selected by ``[store] url = "postgresql://..."`` (or ``url_env``, the name of an
environment variable holding the URL, so a password stays out of the file). The
journal, the ledger and budgets, the API keys and the approvals then live in that
database; the embedded SQLite default is unchanged when no URL is set.

Migrations: table ``agentkeel_schema`` records each applied version (1, 2, 3... with
no gaps). ``migrate`` takes a transaction-level advisory lock first, so replicas
starting at once apply each migration exactly once; a database newer than this
agentkeel is refused, naming both versions. Each store opens the database through
``database(url)``, which migrates it on first use in the process.

Errors: a server that cannot be reached, or a statement that fails for a reason other
than the caller's input, raises ``StoreError`` naming the server (never the password).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import attrs

from agentkeel.errors import ConfigError, StoreError

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

    from agentkeel.config import Config

_T = TypeVar("_T")

SCHEMES = ("postgresql", "postgres")
MIGRATION_LOCK = 0x61676B6C  # "agkl": the advisory lock migrations hold
DEFAULT_POOL_MAX = 10
CONNECT_TIMEOUT_S = 10.0


@attrs.frozen
class PgMigration:
    """One step of the PostgreSQL schema: ``statements`` take it from ``version - 1`` to ``version``."""

    version: int
    component: str
    statements: tuple[str, ...]


def _history() -> tuple[PgMigration, ...]:
    from agentkeel.pg_schema import HISTORY

    return tuple(PgMigration(n, component, statements) for n, (component, statements) in enumerate(HISTORY, 1))


PG_MIGRATIONS: tuple[PgMigration, ...] = _history()
"""The schema history, in order (``agentkeel.pg_schema``)."""


def store_url(config: Config) -> str | None:
    """``[store] url`` (or the variable ``url_env`` names), checked; None when not set."""
    section = config.section("store")
    url = section.get("url")
    env = section.get("url_env")
    if env:
        url = os.environ.get(str(env))
        if not url:
            raise ConfigError(f"[store] url_env names {env!r}, which is not set in the environment")
    if url is None:
        return None
    if not isinstance(url, str) or urlsplit(url).scheme not in SCHEMES:
        raise ConfigError(f"[store] url must be a postgresql:// URL, got {redact(str(url))!r}")
    return url


def redact(url: str) -> str:
    """``url`` without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


class Database:
    """A pool of connections to one PostgreSQL database, migrated on first use."""

    def __init__(self, url: str, *, max_size: int = DEFAULT_POOL_MAX) -> None:
        try:
            import psycopg  # noqa: F401 - fail here, with advice, when the driver is missing
            from psycopg_pool import ConnectionPool
        except ImportError as exc:
            raise ConfigError('[store] url needs PostgreSQL support: pip install "agentkeel[postgres]"') from exc
        self.url = url
        self.label = redact(url)
        self._pool: ConnectionPool[Any] = ConnectionPool(
            url, min_size=1, max_size=max_size, open=False, timeout=CONNECT_TIMEOUT_S,
            kwargs={"autocommit": False, "connect_timeout": int(CONNECT_TIMEOUT_S)},
        )
        self._opened = False
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _open(self) -> None:
        with self._lock:
            if self._opened and self._pid == os.getpid():
                return
            if self._pid != os.getpid():  # a forked child never uses its parent's connections
                from psycopg_pool import ConnectionPool

                self._pool = ConnectionPool(self.url, min_size=1, max_size=self._pool.max_size, open=False,
                                            timeout=CONNECT_TIMEOUT_S,
                                            kwargs={"autocommit": False, "connect_timeout": int(CONNECT_TIMEOUT_S)})
                self._pid = os.getpid()
            import psycopg

            try:
                # One direct connection first: a refused or unknown server fails at once, where
                # the pool would keep retrying until its timeout.
                psycopg.connect(self.url, connect_timeout=int(CONNECT_TIMEOUT_S)).close()
                self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
            except Exception as exc:  # any failure to connect is the store being unreachable
                raise StoreError(f"cannot reach PostgreSQL at {self.label}: {exc}") from exc
            self._opened = True
            self.run("migrate", migrate)

    def run(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        """``fn(conn)`` in one transaction (committed when it returns, rolled back when it raises)."""
        if not self._opened or self._pid != os.getpid():
            self._open()
        import psycopg

        try:
            with self._pool.connection() as conn, conn.transaction():
                return fn(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            raise StoreError(f"PostgreSQL at {self.label} failed during {what}: {exc}") from exc
        except Exception as exc:
            from psycopg_pool import PoolTimeout

            if isinstance(exc, PoolTimeout):
                raise StoreError(f"no PostgreSQL connection to {self.label} within {CONNECT_TIMEOUT_S:.0f}s "
                                 f"during {what}: {exc}") from exc
            raise

    def close(self) -> None:
        with self._lock:
            if self._opened and self._pid == os.getpid():
                self._pool.close()
            self._opened = False


_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


def database(url: str) -> Database:
    """The process's pool for ``url`` (one per URL, shared by every store on it)."""
    with _databases_lock:
        db = _databases.get(url)
        if db is None or db._pid != os.getpid():
            db = _databases[url] = Database(url)
        return db


def close_all() -> None:
    """Close every pool of this process (tests; a process exiting closes them anyway)."""
    with _databases_lock:
        for db in _databases.values():
            db.close()
        _databases.clear()


def migrate(conn: psycopg.Connection[Any], migrations: Sequence[PgMigration] | None = None) -> int:
    """Apply the migrations the database lacks, under the migration lock; the resulting version."""
    history = list(PG_MIGRATIONS if migrations is None else migrations)
    for expected, migration in enumerate(history, start=1):
        if migration.version != expected:
            raise RuntimeError(f"PostgreSQL migrations must run 1, 2, 3... with no gaps; entry {expected} "
                               f"({migration.component}) has version {migration.version}")
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    conn.execute("CREATE TABLE IF NOT EXISTS agentkeel_schema (version INTEGER PRIMARY KEY, "
                 "component TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
    row = conn.execute("SELECT coalesce(max(version), 0) FROM agentkeel_schema").fetchone()
    current = int(row[0]) if row else 0
    latest = len(history)
    if current > latest:
        raise StoreError(f"the PostgreSQL schema is at version {current}, newer than this agentkeel knows "
                         f"({latest}); upgrade agentkeel")
    for migration in history[current:]:
        for statement in migration.statements:
            conn.execute(statement)  # literal SQL of agentkeel.pg_schema
        conn.execute("INSERT INTO agentkeel_schema (version, component) VALUES (%s, %s)",
                     (migration.version, migration.component))
    return latest


def schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT coalesce(max(version), 0) FROM agentkeel_schema").fetchone()
    return int(row[0]) if row else 0
