"""API keys for the HTTP service: who a request comes from, behind one small protocol.

A key's secret is ``ak_<key_id>_<token>``: ``key_id`` is 12 lowercase hex
characters (``secrets.token_hex(6)``), public, and names the key in listings,
logs and the audit log; ``token`` is ``secrets.token_urlsafe(32)``, 256 random
bits. The secret is shown once, when the key is created; a store keeps only the
SHA-256 of the token. A fast hash is right here: the token is high-entropy
random, not a password a person chose, so there is nothing to guess and no
dictionary to slow down (a slow password hash would only make every request
slower). Whoever reads the store learns which keys exist and for whom, never a
secret that authenticates.

``authenticate`` looks the key up by its id and compares the hash of the token
presented with the stored one using ``hmac.compare_digest`` (constant time).
When the id is unknown it compares against a fixed dummy hash anyway, so an
unknown key and a known one (revoked, expired, or with a wrong token) do the
same work: one SHA-256 and one constant-time comparison. There is no timing
difference between "no such key" and "that key is revoked" to tell a caller
which key ids exist. Only a caller holding the right token learns a key's state
("revoked", "expired"); a wrong token for a known id is "unknown key", exactly
as for an id that does not exist.

Backends: ``MemoryKeyStore`` here (one process) and
``agentkeel.permissions.keys_sqlite.SQLiteKeyStore`` (table ``api_keys`` in
``<home>/agentkeel.db``, shared by processes). Both pass
``tests/permissions/keys_conformance.py``; the plugins open one through
``agentkeel_open_key_store``.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import re
import secrets
import threading
import time
from collections.abc import Callable
from hmac import compare_digest
from typing import Any, Protocol, runtime_checkable

import attrs

from agentkeel.errors import StoreError
from agentkeel.jsonvalue import real_number

__all__ = [
    "AUTH_REASONS",
    "KEY_PREFIX",
    "MAX_NAME_LENGTH",
    "MAX_SECRET_LENGTH",
    "STATES",
    "ApiKey",
    "AuthResult",
    "KeyStore",
    "MemoryKeyStore",
    "hash_token",
    "new_secret",
    "parse_secret",
]

KEY_PREFIX = "ak_"
KEY_ID_LENGTH = 12
"""Hex characters of a key id: ``secrets.token_hex(6)``, 48 bits."""
TOKEN_BYTES = 32
"""Random bytes of a token: 256 bits."""
TOKEN_LENGTH = 43
"""Characters of ``secrets.token_urlsafe(32)`` (base64url of 32 bytes, no padding)."""
MAX_SECRET_LENGTH = 200
"""Longer input is refused before any other work (a secret is 59 characters)."""
MAX_NAME_LENGTH = 200
"""The longest ``name`` a key may have."""
LAST_USED_RESOLUTION_S = 1.0
"""``last_used_at`` is written at most once per this many seconds per key (a read-mostly hot path)."""

STATES = ("active", "revoked", "expired")
AUTH_REASONS = ("ok", "unknown key", "malformed key", "revoked", "expired")

_SECRET = re.compile(rf"ak_([0-9a-f]{{{KEY_ID_LENGTH}}})_([A-Za-z0-9_-]{{{TOKEN_LENGTH}}})")
_DUMMY_HASH = hashlib.sha256(b"agentkeel: the token of no key").hexdigest()
"""Compared against when the key id is unknown, so that path does the work of a known one."""


@attrs.frozen
class ApiKey:
    """One API key as a store keeps it: never its secret, nor the hash of its token.

    ``principal`` is who requests made with the key act as (a ``[principals.NAME]``
    of the configuration, checked again on every request). Times are Unix seconds.
    ``expires_at`` None: the key never expires; ``revoked_at`` None: not revoked.
    ``rate_limit``: requests per second the service allows this key (None: no
    limit of its own). ``last_used_at``: the last successful authentication, to
    within ``LAST_USED_RESOLUTION_S`` (None: never used).
    """

    key_id: str
    principal: str
    name: str
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    rate_limit: float | None
    last_used_at: float | None = None

    def state_at(self, now: float) -> str:
        """What the key is at ``now``: "revoked" once revoked (whatever its expiry), else
        "expired" from ``expires_at`` on, else "active"."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values (the fields above; no secret, no hash)."""
        return attrs.asdict(self)


@attrs.frozen
class AuthResult:
    """What ``KeyStore.authenticate`` found. ``key`` is set only when ``reason`` is "ok";
    otherwise ``reason`` says why the secret was refused: "malformed key" (not of the
    ``ak_<id>_<token>`` shape), "unknown key" (no such id, or a wrong token for it),
    "revoked" or "expired" (the right token of a key that no longer authenticates)."""

    key: ApiKey | None
    reason: str

    @property
    def ok(self) -> bool:
        return self.key is not None


@runtime_checkable
class KeyStore(Protocol):
    """API keys: created, authenticated, listed and revoked. Every method is synchronous,
    thread-safe, and has committed when it returns. ``now`` (Unix seconds) defaults to
    the store's clock; pass it to decide at another instant (tests, replays)."""

    def create(self, principal: str, *, name: str = "", expires_at: float | None = None,
               rate_limit: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        """A new active key for ``principal``: its secret (``ak_<key_id>_<token>``: give it
        to the caller now, it cannot be read back) and its record.

        ``ValueError`` naming the field, and nothing stored, unless ``principal`` is
        non-empty text, ``name`` text of at most ``MAX_NAME_LENGTH`` characters,
        ``expires_at`` None or a finite time after ``now``, and ``rate_limit`` None or
        a finite number > 0.
        """
        ...

    def authenticate(self, secret: str, now: float | None = None) -> AuthResult:
        """Who ``secret`` is: ``AuthResult(key, "ok")`` for the right token of an active
        key (and ``last_used_at`` set to ``now``, unless it was set within
        ``LAST_USED_RESOLUTION_S``), else ``AuthResult(None, reason)``. Never raises for
        what a caller sends (anything not a well-formed secret is "malformed key");
        unknown and known ids take the same work (see the module docstring)."""
        ...

    def get(self, key_id: str) -> ApiKey | None:
        """The key with id ``key_id``, or None."""
        ...

    def list(self, principal: str | None = None) -> builtins.list[ApiKey]:
        """Every key (of ``principal`` only, when given), newest first, revoked and expired ones included."""
        ...

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        """Revoke a key from ``now`` on and return its record. Revoking a revoked key
        changes nothing (the first ``revoked_at`` stays). ``LookupError`` ("no API
        key ID") when there is no such key."""
        ...

    def close(self) -> None:
        """Release resources; using the store afterwards raises ``StoreError``. Idempotent."""
        ...


# --- secrets -------------------------------------------------------------------------------


def hash_token(token: str) -> str:
    """What a store keeps of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_secret() -> tuple[str, str, str]:
    """A fresh ``(secret, key_id, token_hash)``."""
    key_id = secrets.token_hex(KEY_ID_LENGTH // 2)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return f"{KEY_PREFIX}{key_id}_{token}", key_id, hash_token(token)


def parse_secret(secret: object) -> tuple[str, str] | None:
    """``(key_id, token)`` of a well-formed secret, else None: not a string, longer than
    ``MAX_SECRET_LENGTH`` (checked before anything else), not ASCII, another prefix,
    a key id that is not 12 lowercase hex characters, or a token of the wrong length
    or alphabet."""
    if not isinstance(secret, str) or len(secret) > MAX_SECRET_LENGTH or not secret.isascii():
        return None
    found = _SECRET.fullmatch(secret)
    if found is None:
        return None
    return found.group(1), found.group(2)


def verdict(token: str, found: tuple[ApiKey, str] | None, now: float) -> AuthResult:
    """The answer for ``token`` given the ``(record, token_hash)`` stored under its key id
    (None: no such id). Exactly one SHA-256 and one ``compare_digest`` on every path, the
    unknown id included (against ``_DUMMY_HASH``); the key's state counts only after the
    token matched."""
    stored = found[1] if found is not None else _DUMMY_HASH
    matches = compare_digest(hash_token(token), stored)
    if found is None or not matches:
        return AuthResult(None, "unknown key")
    key = found[0]
    state = key.state_at(now)
    if state != "active":
        return AuthResult(None, state)
    return AuthResult(key, "ok")


def needs_touch(key: ApiKey, now: float) -> bool:
    """Whether a successful authentication at ``now`` should write ``last_used_at``."""
    return key.last_used_at is None or abs(now - key.last_used_at) >= LAST_USED_RESOLUTION_S


# --- checks shared by the backends ----------------------------------------------------------


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_now(now: object, clock: Callable[[], float]) -> float:
    """``now``, or the clock's time when None; ValueError unless a finite time."""
    if now is None:
        return float(clock())
    number = real_number(now)
    if number is None or not math.isfinite(number):
        raise ValueError(f"now must be None or a finite Unix time in seconds, got {_shown(now)}")
    return number


def check_key_id(key_id: object) -> str:
    if not isinstance(key_id, str):
        raise ValueError(f"key_id must be a string, got {_shown(key_id)}")
    return key_id


def check_principal_filter(principal: object) -> str | None:
    if principal is not None and not isinstance(principal, str):
        raise ValueError(f"principal must be None or a principal's name, got {_shown(principal)}")
    return principal


@attrs.frozen
class NewKey:
    """A checked ``create`` request: what a backend stores (with the hash of the token)."""

    principal: str
    name: str
    created_at: float
    expires_at: float | None
    rate_limit: float | None

    def record(self, key_id: str) -> ApiKey:
        return ApiKey(key_id=key_id, principal=self.principal, name=self.name, created_at=self.created_at,
                      expires_at=self.expires_at, revoked_at=None, rate_limit=self.rate_limit)


def check_create(principal: object, name: object, expires_at: object, rate_limit: object, now: float) -> NewKey:
    """The fields of a new key, or ValueError naming the first one that is wrong."""
    if not isinstance(principal, str) or not principal.strip() or not _utf8(principal):
        raise ValueError(f"principal must be a principal's name (non-empty text), got {_shown(principal)}")
    if not isinstance(name, str) or not _utf8(name):
        raise ValueError(f"name must be text, got {_shown(name)}")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"name must be at most {MAX_NAME_LENGTH} characters, got {len(name)}")
    expires: float | None = None
    if expires_at is not None:
        expires = real_number(expires_at)
        if expires is None or not math.isfinite(expires):
            raise ValueError(f"expires_at must be None or a finite Unix time, got {_shown(expires_at)}")
        if expires <= now:
            raise ValueError(f"expires_at must be in the future (after {now!r}), got {_shown(expires_at)}")
    limit: float | None = None
    if rate_limit is not None:
        limit = real_number(rate_limit)
        if limit is None or not math.isfinite(limit) or limit <= 0:
            raise ValueError(f"rate_limit must be None or a finite number of requests per second > 0, "
                             f"got {_shown(rate_limit)}")
    return NewKey(principal, name, now, expires, limit)


def no_such_key(key_id: str) -> LookupError:
    return LookupError(f"no API key {key_id}")


def newest_first(keys: builtins.list[tuple[int, ApiKey]]) -> builtins.list[ApiKey]:
    """Keys by ``created_at``, newest first; of two created at once, the later created first."""
    return [key for _, key in sorted(keys, key=lambda pair: (pair[1].created_at, pair[0]), reverse=True)]


# --- the in-process backend -----------------------------------------------------------------


class MemoryKeyStore:
    """The ``KeyStore`` protocol in memory, for one process (tests, ``[journal] backend =
    "memory"``). Like ``SQLiteKeyStore`` it keeps only the hash of each token. One lock
    guards every call. ``clock`` gives ``now`` when a call passes none."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[int, ApiKey, str]] = {}  # key_id -> (sequence, record, token hash)
        self._seq = 0
        self._closed = False

    def create(self, principal: str, *, name: str = "", expires_at: float | None = None,
               rate_limit: float | None = None, now: float | None = None) -> tuple[str, ApiKey]:
        moment = check_now(now, self._clock)
        new = check_create(principal, name, expires_at, rate_limit, moment)
        with self._lock:
            self._check_open()
            while True:
                secret, key_id, token_hash = new_secret()
                if key_id not in self._keys:  # 48 random bits: a clash is rare, never a reuse
                    break
            record = new.record(key_id)
            self._seq += 1
            self._keys[key_id] = (self._seq, record, token_hash)
        return secret, record

    def authenticate(self, secret: str, now: float | None = None) -> AuthResult:
        parsed = parse_secret(secret)
        if parsed is None:
            return AuthResult(None, "malformed key")
        key_id, token = parsed
        moment = check_now(now, self._clock)
        with self._lock:
            self._check_open()
            held = self._keys.get(key_id)
            result = verdict(token, None if held is None else (held[1], held[2]), moment)
            if result.key is not None and held is not None and needs_touch(result.key, moment):
                touched = attrs.evolve(result.key, last_used_at=moment)
                self._keys[key_id] = (held[0], touched, held[2])
                result = AuthResult(touched, "ok")
        return result

    def get(self, key_id: str) -> ApiKey | None:
        wanted = check_key_id(key_id)
        with self._lock:
            self._check_open()
            held = self._keys.get(wanted)
        return None if held is None else held[1]

    def list(self, principal: str | None = None) -> builtins.list[ApiKey]:
        wanted = check_principal_filter(principal)
        with self._lock:
            self._check_open()
            keys = [(seq, key) for seq, key, _ in self._keys.values() if wanted is None or key.principal == wanted]
        return newest_first(keys)

    def revoke(self, key_id: str, now: float | None = None) -> ApiKey:
        wanted = check_key_id(key_id)
        moment = check_now(now, self._clock)
        with self._lock:
            self._check_open()
            held = self._keys.get(wanted)
            if held is None:
                raise no_such_key(wanted)
            seq, key, token_hash = held
            if key.revoked_at is None:
                key = attrs.evolve(key, revoked_at=moment)
                self._keys[wanted] = (seq, key, token_hash)
        return key

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the in-memory API key store is closed; open a new MemoryKeyStore")

    def __repr__(self) -> str:
        return f"MemoryKeyStore(keys={len(self._keys)})"
