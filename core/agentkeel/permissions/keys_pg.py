"""The shared ``KeyStore`` on PostgreSQL: table ``api_keys`` (``agentkeel.pg_schema.keys``),
selected by ``[store] url``, so every replica of the service sees the same keys.

Promises, on top of the ``agentkeel.permissions.keys.KeyStore`` protocol (the semantics
of ``SQLiteKeyStore``, checked by ``tests/permissions/keys_conformance.py``):

- The database holds the SHA-256 of each token, never a secret (``token_hash``); only
  the hash is ever sent to the server.
- Safe across threads, processes and hosts: each call is one transaction on a pooled
  connection (``agentkeel.pg.database``) and reads the table; nothing is cached, so a
  key created or revoked by one replica is seen by every other on its next call.
  ``revoke`` sets ``revoked_at`` only where it is NULL (a concurrent revocation waits
  for the row lock, then finds it set), so the first revocation's time stays.
- ``authenticate`` reads one row by primary key and does one SHA-256 and one
  ``compare_digest`` whatever the key's state (``verdict``); it writes only when
  ``last_used_at`` is older than ``LAST_USED_RESOLUTION_S``.
- PostgreSQL text cannot hold NUL characters: ``create`` refuses a principal or name
  with one (``ValueError`` naming the field), and a ``get``, ``list`` or ``revoke``
  argument with one matches no key (as it could match none stored).
- A server that cannot be reached raises ``StoreError`` naming it (never its password).
- ``close`` closes this handle only: the pool is the process's, shared by every store
  on the URL.
"""

from __future__ import annotations

import builtins
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

import agentkeel.pg as pg
from agentkeel.errors import StoreError
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

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresKeyStore"]

_T = TypeVar("_T")
_COLUMNS = "key_id, principal, name, created_at, expires_at, revoked_at, rate_limit, last_used_at"
_ATTEMPTS = 8
"""Fresh key ids tried when one is taken (48 random bits: one clash is already rare)."""


class PostgresKeyStore:
    """The API key store in the PostgreSQL database at ``url`` (migrated on first use).

    ``clock`` gives ``now`` when a call passes none (every replica sharing the database
    should use the real one). Opening connects, so an unreachable server fails here.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.label = pg.redact(url)
        self._clock = clock
        self._closed = False
        self._lock = threading.Lock()
        self._run("open", lambda conn: None)

    def _run(self, what: str, fn: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError(f"the API key store at {self.label} is closed; open a new PostgresKeyStore")
        return pg.database(self.url).run(what, fn)

    def create(self, principal: str, *, name: str = "", expires_at: float | None = None,
               rate_limit: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        moment = check_now(now, self._clock)
        new = check_create(principal, name, expires_at, rate_limit, moment)
        if "\x00" in new.principal:
            raise ValueError("principal must not hold a NUL character (PostgreSQL text cannot)")
        if "\x00" in new.name:
            raise ValueError("name must not hold a NUL character (PostgreSQL text cannot)")

        def insert(conn: psycopg.Connection[Any]) -> tuple[str, ApiKey]:
            for _ in range(_ATTEMPTS):
                secret, key_id, token_hash = new_secret()
                inserted = conn.execute(
                    "INSERT INTO api_keys "
                    "(key_id, principal, name, token_hash, created_at, expires_at, revoked_at, rate_limit) "
                    "VALUES (%s, %s, %s, %s, %s, %s, NULL, %s) ON CONFLICT (key_id) DO NOTHING",
                    (key_id, new.principal, new.name, token_hash, new.created_at, new.expires_at, new.rate_limit),
                ).rowcount
                if inserted:
                    return secret, new.record(key_id)
            raise StoreError(f"{_ATTEMPTS} fresh key ids were all taken in {self.label}")

        return self._run("create", insert)

    def authenticate(self, secret: str, now: float | None = None) -> AuthResult:
        parsed = parse_secret(secret)
        if parsed is None:
            return AuthResult(None, "malformed key")
        key_id, token = parsed
        moment = check_now(now, self._clock)

        def check(conn: psycopg.Connection[Any]) -> AuthResult:
            row = conn.execute(f"SELECT {_COLUMNS}, token_hash FROM api_keys WHERE key_id = %s",
                               (key_id,)).fetchone()
            result = verdict(token, None if row is None else (_key(row[:-1]), str(row[-1])), moment)
            key = result.key
            if key is None or not needs_touch(key, moment):
                return result
            conn.execute("UPDATE api_keys SET last_used_at = %s WHERE key_id = %s", (moment, key_id))
            return AuthResult(attrs.evolve(key, last_used_at=moment), "ok")

        return self._run("authenticate", check)

    def get(self, key_id: str) -> ApiKey | None:
        wanted = check_key_id(key_id)
        row = self._run("get", lambda conn: None if not _storable(wanted) else conn.execute(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = %s", (wanted,)).fetchone())
        return None if row is None else _key(row)

    def list(self, principal: str | None = None) -> builtins.list[ApiKey]:
        wanted = check_principal_filter(principal)

        def select(conn: psycopg.Connection[Any]) -> builtins.list[tuple[Any, ...]]:
            if wanted is None:
                return conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at DESC, seq DESC").fetchall()
            if not _storable(wanted):
                return []
            return conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE principal = %s "
                                "ORDER BY created_at DESC, seq DESC", (wanted,)).fetchall()

        return [_key(row) for row in self._run("list", select)]

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        wanted = check_key_id(key_id)
        moment = check_now(now, self._clock)

        def revoke(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            if not _storable(wanted):
                return None
            conn.execute("UPDATE api_keys SET revoked_at = %s WHERE key_id = %s AND revoked_at IS NULL",
                         (moment, wanted))
            return conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_id = %s", (wanted,)).fetchone()

        row = self._run("revoke", revoke)
        if row is None:
            raise no_such_key(wanted)
        return _key(row)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def __repr__(self) -> str:
        return f"PostgresKeyStore({self.label!r})"


def _storable(text: str) -> bool:
    """Whether PostgreSQL text can hold ``text`` (UTF-8, no NUL); what it cannot hold matches no row."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional(value: Any) -> float | None:
    return None if value is None else float(value)


def _key(row: tuple[Any, ...]) -> ApiKey:
    key_id, principal, name, created_at, expires_at, revoked_at, rate_limit, last_used_at = row
    return ApiKey(key_id=str(key_id), principal=str(principal), name=str(name), created_at=float(created_at),
                  expires_at=_optional(expires_at), revoked_at=_optional(revoked_at),
                  rate_limit=_optional(rate_limit), last_used_at=_optional(last_used_at))
