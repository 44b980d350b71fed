"""The anchor of an audit log in PostgreSQL (table ``audit_heads``,
``agentkeel.pg_schema.audit``), used with ``[store] url``.

Each replica keeps its own hash-chained ``<home>/audit.jsonl`` (appends stay local);
its anchor (record count, head hash, end offset, time) is checkpointed here, outside the
replica, at the same moments as the SQLite anchor in ``<home>/agentkeel.db`` (the end of
every request, and at most ``ANCHOR_INTERVAL_S`` after an append): one UPSERT per request,
never per record. So truncating a log, or replacing it together with the local
``agentkeel.db``, is detected by ``verify`` against this row.

Chain id: ``chain_id(path)`` is ``<host>:<absolute, resolved log path>``. It is derived,
not stored next to the log, so deleting or replacing anything in the home cannot give
the log a fresh, unanchored identity. Moving the home or renaming the host starts a new
row (the old one stays, and ``agentkeel audit verify --all`` lists it); containers
should have a stable host name per volume (a StatefulSet's pod name), or pass
``chain_id=`` explicitly.

psycopg is imported only when a ``PostgresAnchor`` is used (``agentkeel.pg``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from agentkeel.errors import AuditLogError, StoreError
from agentkeel.permissions.audit import Anchor, StoredAnchor

if TYPE_CHECKING:
    import psycopg

__all__ = ["HeadRow", "PostgresAnchor", "chain_id", "list_heads"]

_T = TypeVar("_T")
TABLE = "audit_heads"

_UPSERT = (
    f"INSERT INTO {TABLE} (chain_id, host, log_path, count, head, size, updated_at) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (chain_id) DO UPDATE SET "
    "count = excluded.count, head = excluded.head, size = excluded.size, "
    "updated_at = excluded.updated_at, anchored_at = now() "
    f"WHERE excluded.count > {TABLE}.count"
)


def host_name() -> str:
    return socket.gethostname()


def chain_id(path: str | os.PathLike[str], *, host: str | None = None) -> str:
    """The id of the chain in the log at ``path`` on this host: ``<host>:<absolute path>``."""
    return f"{host or host_name()}:{Path(path).expanduser().resolve()}"


def _run(url: str, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
    import agentkeel.pg as pg

    return pg.database(url).run(what, fn)


class PostgresAnchor:
    """The ``audit_heads`` row of one chain in the PostgreSQL database at ``url``.

    ``path`` is the log (on this host); ``chain`` its id, ``chain_id(path)`` by default.
    Failures raise ``AuditLogError`` naming the server (never its password)."""

    local = False

    def __init__(self, url: str, path: str | os.PathLike[str], *, chain: str | None = None) -> None:
        import agentkeel.pg as pg

        self.url = url
        self.path = Path(path)
        self.host = host_name()
        self.log_path = str(self.path.expanduser().resolve())
        self.chain = chain if chain is not None else chain_id(self.path, host=self.host)
        self.where = f"PostgreSQL at {pg.redact(url)} (table {TABLE}, chain {self.chain})"

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        try:
            return _run(self.url, what, fn)
        except StoreError as exc:
            raise AuditLogError(f"{exc} (the anchor of the audit log {self.path})") from exc

    def open(self) -> None:
        self._run("open the audit anchor", lambda conn: None)  # connects and migrates; the pool is per process

    def load(self) -> StoredAnchor | None:
        row = self._run("read the audit anchor", lambda conn: conn.execute(
            f"SELECT count, head, broken, size FROM {TABLE} WHERE chain_id = %s", (self.chain,)
        ).fetchone())
        if row is None:
            return None
        return int(row[0]), str(row[1]), row[2], row[3]

    def mark_broken(self, detail: str) -> None:
        self._run("mark the audit chain broken", lambda conn: conn.execute(
            f"UPDATE {TABLE} SET broken = %s WHERE chain_id = %s AND broken IS NULL", (detail, self.chain)
        ))

    def save(self, head: str, count: int, ts: float, end: int) -> None:
        try:
            self._run("anchor the audit log", lambda conn: conn.execute(
                _UPSERT, (self.chain, self.host, self.log_path, count, head, end, ts)
            ))
        except AuditLogError as exc:
            raise AuditLogError(
                f"record {count} was appended to {self.path}, but its anchor in {self.where} could not "
                f"be updated ({exc}); the next anchoring updates it, and until then "
                "`agentkeel audit verify` reports the record as not anchored"
            ) from exc

    def read(self) -> Anchor | str:
        row = self._run("read the audit anchor", lambda conn: conn.execute(
            f"SELECT count, head, updated_at, broken FROM {TABLE} WHERE chain_id = %s", (self.chain,)
        ).fetchone())
        if row is None:
            return f"{self.where} holds no anchor for this log (nothing was appended with [store] url set)"
        return Anchor(int(row[0]), str(row[1]), float(row[2]), row[3])

    def close(self) -> None:
        """Nothing to close: the pool is the process's, shared by every store on the URL."""


@attrs.frozen
class HeadRow:
    """One row of ``audit_heads``."""

    chain_id: str
    host: str
    log_path: str
    count: int
    head: str
    size: int | None
    updated_at: float
    broken: str | None


def list_heads(url: str) -> list[HeadRow]:
    """Every chain anchored in the database at ``url``, by host and path. Raises ``StoreError``."""
    rows = _run(url, "list the audit anchors", lambda conn: conn.execute(
        f"SELECT chain_id, host, log_path, count, head, size, updated_at, broken FROM {TABLE} "
        "ORDER BY host, log_path, chain_id"
    ).fetchall())
    return [HeadRow(str(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]),
                    None if r[5] is None else int(r[5]), float(r[6]), r[7]) for r in rows]
