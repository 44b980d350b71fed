"""The API key store conformance suite against PostgreSQL, plus the equal work of unknown and
known keys (counted), the PostgreSQL schema, and the default ``agentkeel_open_key_store``
opening a ``PostgresKeyStore`` when ``[store] url`` is set. Every test gets a fresh,
empty database (``pg_url``); without PostgreSQL they skip (and fail under CI=true)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator

import psycopg
import pytest
from agentkeel import pg
from agentkeel.errors import StoreError
from agentkeel.permissions.keys import AuthResult, KeyStore, new_secret
from agentkeel.permissions.keys_pg import PostgresKeyStore
from agentkeel.testing import make_system
from agentkeel.testing.services import free_port

from tests.permissions.keys_conformance import T0, FakeClock, KeyStoreConformance, other_token, with_token
from tests.permissions.test_keys import _counting


class TestPostgresKeyStore(KeyStoreConformance):
    SHARED = True

    @pytest.fixture
    def make_store(self, pg_url: str) -> Iterator[Callable[..., KeyStore]]:
        opened: list[PostgresKeyStore] = []

        def make(clock: Callable[[], float] = time.time) -> KeyStore:
            opened.append(PostgresKeyStore(pg_url, clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()

    @pytest.fixture
    def stored(self) -> Callable[[KeyStore], bytes]:
        def held(store: KeyStore) -> bytes:
            """Every row of ``api_keys``, each as PostgreSQL's text of the whole row."""
            assert isinstance(store, PostgresKeyStore)
            with psycopg.connect(store.url) as conn:
                rows = conn.execute("SELECT t::text FROM api_keys AS t ORDER BY seq").fetchall()
            return "\n".join(str(row[0]) for row in rows).encode()

        return held


# --- no timing difference between an unknown and a known key -------------------------------------


def test_every_well_formed_secret_costs_one_hash_and_one_constant_time_comparison(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PostgresKeyStore(pg_url)
    try:
        revoked, revoked_key = store.create("alice")
        store.revoke(revoked_key.key_id)
        expired, _ = store.create("alice", expires_at=T0 + 1, now=T0)
        active, _ = store.create("alice")
        unknown, _, _ = new_secret()
        calls = _counting(monkeypatch)
        cases = {
            "unknown": (unknown, "unknown key"),
            "revoked": (revoked, "revoked"),
            "expired": (expired, "expired"),
            "wrong token": (with_token(active, other_token(active)), "unknown key"),
            "ok": (active, "ok"),
        }
        for case, (secret, reason) in cases.items():
            before = dict(calls)
            assert store.authenticate(secret).reason == reason, case
            assert calls["compare_digest"] - before["compare_digest"] == 1, case
            assert calls["hash_token"] - before["hash_token"] == 1, case
        before = dict(calls)
        assert store.authenticate("not a key") == AuthResult(None, "malformed key")
        assert calls == before  # a malformed secret is refused on its shape alone
    finally:
        store.close()


# --- PostgreSQL only -----------------------------------------------------------------------------


def test_the_keys_migration_creates_the_table_and_its_index(pg_url: str) -> None:
    PostgresKeyStore(pg_url).close()
    [keys] = [m for m in pg.PG_MIGRATIONS if m.component == "keys"]
    assert keys.version == 3
    with psycopg.connect(pg_url) as conn:
        assert pg.schema_version(conn) == len(pg.PG_MIGRATIONS)
        columns = {name: (kind, nullable == "NO") for name, kind, nullable in conn.execute(
            "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
            "WHERE table_name = 'api_keys'")}
        real = "double precision"
        assert columns == {
            "key_id": ("text", True), "principal": ("text", True), "name": ("text", True),
            "token_hash": ("text", True), "created_at": (real, True), "expires_at": (real, False),
            "revoked_at": (real, False), "rate_limit": (real, False), "last_used_at": (real, False),
            "seq": ("bigint", True),
        }
        [index] = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = 'api_keys' "
                               "AND indexname = 'api_keys_by_principal'").fetchone() or (None,)
        assert index is not None and "(principal, created_at)" in index


def test_only_the_token_hash_is_in_the_table(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url, clock=FakeClock())
    try:
        secret, key = store.create("alice", name="n", rate_limit=1.5)
    finally:
        store.close()
    with psycopg.connect(pg_url) as conn:
        [row] = conn.execute("SELECT key_id, principal, name, token_hash, created_at, expires_at, "
                             "revoked_at, rate_limit, last_used_at FROM api_keys").fetchall()
    token = secret[16:]
    assert row == (key.key_id, "alice", "n", hashlib.sha256(token.encode()).hexdigest(), T0, None, None, 1.5, None)
    assert not any(token in str(value) for value in row)


def test_text_postgresql_cannot_hold_is_refused_or_matches_nothing(pg_url: str) -> None:
    store = PostgresKeyStore(pg_url, clock=FakeClock())
    try:
        with pytest.raises(ValueError, match="name"):
            store.create("alice", name="nul\x00")
        with pytest.raises(ValueError, match="principal"):
            store.create("al\x00ice")
        assert store.list() == []
        store.create("alice")
        assert store.get("\x00") is None and store.get("\ud800") is None
        assert store.list("al\x00ice") == [] and store.list("\ud800") == []
        with pytest.raises(LookupError, match="no API key"):
            store.revoke("\x00")
    finally:
        store.close()


def test_closing_a_store_leaves_the_shared_pool_open(pg_url: str) -> None:
    first, second = PostgresKeyStore(pg_url), PostgresKeyStore(pg_url)
    first.close()
    with pytest.raises(StoreError, match="closed; open a new PostgresKeyStore"):
        first.list()
    assert second.list() == []
    second.close()


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    url = f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreError) as info:
        PostgresKeyStore(url)
    assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)


# --- the hook ------------------------------------------------------------------------------------


def test_the_default_store_is_postgres_when_store_url_is_set(pg_url: str) -> None:
    with make_system(config={"store": {"url": pg_url}}) as system:
        store = system.plugins.open_key_store(system.config)
        try:
            assert isinstance(store, PostgresKeyStore) and store.url == pg_url
            secret, key = store.create("alice")
        finally:
            store.close()
        again = system.plugins.open_key_store(system.config)
        try:
            assert again.authenticate(secret).ok and again.get(key.key_id) is not None
        finally:
            again.close()
    # the URL wins over the memory journal: keys must be shared by the replicas
    with make_system(config={"store": {"url": pg_url}, "journal": {"backend": "memory"}}) as system:
        store = system.plugins.open_key_store(system.config)
        try:
            assert isinstance(store, PostgresKeyStore) and [k.key_id for k in store.list()] == [key.key_id]
        finally:
            store.close()
