"""The shared ``KeyStore``: table ``api_keys`` in ``<home>/agentkeel.db`` (migration 9).

Promises, on top of the ``agentkeel.permissions.keys.KeyStore`` protocol (the same
semantics as ``MemoryKeyStore``, checked by ``tests/permissions/keys_conformance.py``):

- The file holds the SHA-256 of each token, never a secret (``token_hash``).
- Safe across threads and processes: a key created or revoked by one process is
  seen by every other on its next call (each call reads the table; nothing is
  cached). ``revoke`` is one statement that sets ``revoked_at`` only where it is
  NULL, so the first revocation's time stays, from wherever it was made.
- ``authenticate`` reads one row by primary key; it writes only when ``last_used_at``
  is older than ``LAST_USED_RESOLUTION_S`` (at most one write per key per second).
- Each call has committed when it returns (WAL, ``synchronous = NORMAL``, as set by
  ``agentkeel.stores.open_db``).
- Busy waits follow ``busy_timeout_s``; a database still locked after that, or one
  that cannot be read, raises ``StoreError`` naming the file.
- One connection per store per process, used under a lock; after a fork the child
  opens its own on first use.
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from agentkeel.permissions.keys import (
    ApiKey,
    AuthResult,
    check_create,
    check_key_id,
    check_now,
    check_principal_filter,
    needs_touch,
    new_secret,
    no_such_key,
    parse_secret,
    verdict,
)
from agentkeel.stores import DEFAULT_BUSY_TIMEOUT_S, ProcessConnection, atomic, db_path

__all__ = ["SQLiteKeyStore"]

_COLUMNS = "key_id, principal, name, created_at, expires_at, revoked_at, rate_limit, last_used_at"
_ATTEMPTS = 8
"""Fresh key ids tried when one is taken (48 random bits: one clash is already rare)."""


class SQLiteKeyStore:
    """The API key store in ``<home>/agentkeel.db`` (the file the other embedded stores share).

    ``clock`` gives ``now`` when a call passes none (every process sharing the file
    should use the real one).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.home = Path(home)
        self.path = db_path(self.home)
        self._clock = clock
        self._db = ProcessConnection(self.home, "API key store", busy_timeout_s=busy_timeout_s,
                                     closed_hint="; open a new SQLiteKeyStore")
        self._run = self._db.run

    def create(self, principal: str, *, name: str = "", expires_at: float | None = None,
               rate_limit: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        moment = check_now(now, self._clock)
        new = check_create(principal, name, expires_at, rate_limit, moment)

        def insert(conn: sqlite3.Connection) -> tuple[str, ApiKey]:
            for _ in range(_ATTEMPTS):
                secret, key_id, token_hash = new_secret()
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO api_keys "
                    "(key_id, principal, name, token_hash, created_at, expires_at, revoked_at, rate_limit) "
                    "VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                    (key_id, new.principal, new.name, token_hash, new.created_at, new.expires_at, new.rate_limit),
                ).rowcount
                if inserted:
                    return secret, new.record(key_id)
            raise sqlite3.IntegrityError(f"{_ATTEMPTS} fresh key ids were all taken")

        return self._run("create", lambda conn: atomic(conn, insert))

    def authenticate(self, secret: str, now: float | None = None) -> AuthResult:
        parsed = parse_secret(secret)
        if parsed is None:
            return AuthResult(None, "malformed key")
        key_id, token = parsed
        moment = check_now(now, self._clock)

        def check(conn: sqlite3.Connection) -> AuthResult:
            row = conn.execute(f"SELECT {_COLUMNS}, token_hash FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
            result = verdict(token, None if row is None else (_key(row[:-1]), str(row[-1])), moment)
            key = result.key
            if key is None or not needs_touch(key, moment):
                return result
            conn.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (moment, key_id))
            return AuthResult(attrs.evolve(key, last_used_at=moment), "ok")

        return self._run("authenticate", check)

    def get(self, key_id: str) -> ApiKey | None:
        wanted = check_key_id(key_id)
        row = self._run("get", lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (wanted,)).fetchone())
        return None if row is None else _key(row)

    def list(self, principal: str | None = None) -> builtins.list[ApiKey]:
        wanted = check_principal_filter(principal)
        where, params = ("WHERE principal = ?", (wanted,)) if wanted is not None else ("", ())
        rows = self._run("list", lambda conn: conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created_at DESC, rowid DESC", params).fetchall())
        return [_key(row) for row in rows]

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        wanted = check_key_id(key_id)
        moment = check_now(now, self._clock)

        def revoke(conn: sqlite3.Connection) -> Any:
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                         (moment, wanted))
            return conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = ?", (wanted,)).fetchone()

        row = self._run("revoke", lambda conn: atomic(conn, revoke))
        if row is None:
            raise no_such_key(wanted)
        return _key(row)

    def close(self) -> None:
        self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteKeyStore({str(self.home)!r})"


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _key(row: tuple[Any, ...]) -> ApiKey:
    key_id, principal, name, created_at, expires_at, revoked_at, rate_limit, last_used_at = row
    return ApiKey(key_id=str(key_id), principal=str(principal), name=str(name), created_at=float(created_at),
                  expires_at=_optional(expires_at), revoked_at=_optional(revoked_at),
                  rate_limit=_optional(rate_limit), last_used_at=_optional(last_used_at))
