"""The API key store conformance suite, run against both backends, plus the secret format,
the equal work of unknown and known keys (counted, then timed), the SQLite schema and
the default ``agentkeel_open_key_store``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentkeel import PluginError, hookimpl
from agentkeel.errors import StoreError
from agentkeel.permissions import keys as keys_module
from agentkeel.permissions.keys import (
    MAX_SECRET_LENGTH,
    AuthResult,
    KeyStore,
    MemoryKeyStore,
    hash_token,
    new_secret,
    parse_secret,
)
from agentkeel.permissions.keys_sqlite import SQLiteKeyStore
from agentkeel.stores import MIGRATIONS, db_path, open_db, schema_version
from agentkeel.testing import make_system

from tests.permissions.keys_conformance import T0, FakeClock, KeyStoreConformance, other_token, with_token


class TestMemoryKeyStore(KeyStoreConformance):
    SHARED = False

    @pytest.fixture
    def make_store(self) -> Iterator[Callable[..., KeyStore]]:
        opened: list[MemoryKeyStore] = []

        def make(clock: Callable[[], float] = time.time) -> KeyStore:
            opened.append(MemoryKeyStore(clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()

    @pytest.fixture
    def stored(self) -> Callable[[KeyStore], bytes]:
        def held(store: KeyStore) -> bytes:
            assert isinstance(store, MemoryKeyStore)
            return repr(vars(store)).encode()

        return held


class TestSQLiteKeyStore(KeyStoreConformance):
    SHARED = True

    @pytest.fixture
    def make_store(self, tmp_path: Path) -> Iterator[Callable[..., KeyStore]]:
        opened: list[SQLiteKeyStore] = []

        def make(clock: Callable[[], float] = time.time) -> KeyStore:
            opened.append(SQLiteKeyStore(tmp_path / "home", clock=clock))
            return opened[-1]

        yield make
        for store in opened:
            store.close()

    @pytest.fixture
    def stored(self) -> Callable[[KeyStore], bytes]:
        def held(store: KeyStore) -> bytes:
            assert isinstance(store, SQLiteKeyStore)
            files = [store.path, *(store.path.with_name(store.path.name + s) for s in ("-wal", "-shm"))]
            raw = b"".join(path.read_bytes() for path in files if path.exists())
            conn = open_db(store.home)
            try:
                dump = "\n".join(conn.iterdump()).encode()
            finally:
                conn.close()
            return raw + b"\n" + dump

        return held


# --- the secret format ---------------------------------------------------------------------------


def test_new_secret_is_prefix_id_and_token_and_only_the_hash_of_the_token_is_returned() -> None:
    secret, key_id, token_hash = new_secret()
    assert secret.startswith("ak_") and len(secret) == 3 + 12 + 1 + 43
    assert parse_secret(secret) == (key_id, secret[16:])
    assert len(key_id) == 12 and int(key_id, 16) >= 0 and key_id == key_id.lower()
    assert token_hash == hashlib.sha256(secret[16:].encode()).hexdigest() == hash_token(secret[16:])
    assert secret[16:] not in token_hash


def test_a_token_may_hold_underscores_and_dashes() -> None:
    token = "_-" + "a" * 41
    assert parse_secret(f"ak_0123456789ab_{token}") == ("0123456789ab", token)
    assert parse_secret(f"ak_0123456789ab__{token[1:]}") == ("0123456789ab", f"_{token[1:]}")


def test_parse_secret_caps_the_input_before_any_work() -> None:
    class Counting(str):
        """A string whose scans are counted (isascii, the regular expression's match)."""

        scans = 0

        def isascii(self) -> bool:
            Counting.scans += 1
            return super().isascii()

    assert parse_secret(Counting("a" * (MAX_SECRET_LENGTH + 1))) is None
    assert Counting.scans == 0
    assert parse_secret("x" * MAX_SECRET_LENGTH) is None


# --- no timing difference between an unknown and a known key -------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    store: KeyStore = MemoryKeyStore() if request.param == "memory" else SQLiteKeyStore(tmp_path / "home")
    yield store
    store.close()


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the calls of the constant-time comparison and of the token hash the stores use."""
    calls = {"compare_digest": 0, "hash_token": 0}
    compare, hash_of = keys_module.compare_digest, keys_module.hash_token

    def counted_compare(a: Any, b: Any) -> bool:
        calls["compare_digest"] += 1
        return compare(a, b)

    def counted_hash(token: str) -> str:
        calls["hash_token"] += 1
        return hash_of(token)

    monkeypatch.setattr(keys_module, "compare_digest", counted_compare)
    monkeypatch.setattr(keys_module, "hash_token", counted_hash)
    return calls


def test_every_well_formed_secret_costs_one_hash_and_one_constant_time_comparison(
    any_store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    revoked, revoked_key = any_store.create("alice")
    any_store.revoke(revoked_key.key_id)
    expired, _ = any_store.create("alice", expires_at=T0 + 1, now=T0)
    active, _ = any_store.create("alice")
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
        assert any_store.authenticate(secret).reason == reason, case
        assert calls["compare_digest"] - before["compare_digest"] == 1, case
        assert calls["hash_token"] - before["hash_token"] == 1, case
    before = dict(calls)
    assert any_store.authenticate("not a key") == AuthResult(None, "malformed key")
    assert calls == before  # a malformed secret is refused on its shape alone


# --- SQLite only ---------------------------------------------------------------------------------


def test_the_keys_migration_creates_the_table_and_its_index(tmp_path: Path) -> None:
    SQLiteKeyStore(tmp_path).close()
    assert MIGRATIONS[8].version == 9 and MIGRATIONS[8].component == "keys"
    conn = open_db(tmp_path)
    try:
        assert schema_version(conn) == len(MIGRATIONS)
        columns = {row[1]: (row[2], bool(row[3])) for row in conn.execute("PRAGMA table_info(api_keys)")}
        assert columns == {
            "key_id": ("TEXT", False), "principal": ("TEXT", True), "name": ("TEXT", True),
            "token_hash": ("TEXT", True), "created_at": ("REAL", True), "expires_at": ("REAL", False),
            "revoked_at": ("REAL", False), "rate_limit": ("REAL", False), "last_used_at": ("REAL", False),
        }
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(api_keys)")}
        assert "api_keys_by_principal" in indexes
        plan = " ".join(str(row) for row in conn.execute(
            "EXPLAIN QUERY PLAN SELECT key_id FROM api_keys WHERE principal = 'alice'"))
        assert "api_keys_by_principal" in plan
    finally:
        conn.close()


def test_an_older_file_is_migrated_with_its_data_kept(tmp_path: Path) -> None:
    old = open_db(tmp_path, migrations=MIGRATIONS[:8])
    old.execute("INSERT INTO memory_turns (user_id, session_id, run_id, role, content, ts) "
                "VALUES ('u', 's', 'r', 'user', 'hello', 1.0)")
    old.close()
    store = SQLiteKeyStore(tmp_path)
    try:
        secret, _ = store.create("alice")
        assert store.authenticate(secret).ok
    finally:
        store.close()
    conn = open_db(tmp_path)
    try:
        assert conn.execute("SELECT content FROM memory_turns").fetchall() == [("hello",)]
    finally:
        conn.close()


def test_only_the_token_hash_is_in_the_table(tmp_path: Path) -> None:
    store = SQLiteKeyStore(tmp_path, clock=FakeClock())
    try:
        secret, key = store.create("alice", name="n", rate_limit=1.5)
    finally:
        store.close()
    conn = open_db(tmp_path)
    try:
        [row] = conn.execute("SELECT * FROM api_keys").fetchall()
    finally:
        conn.close()
    token = secret[16:]
    assert row == (key.key_id, "alice", "n", hashlib.sha256(token.encode()).hexdigest(), T0, None, None, 1.5, None)
    assert not any(token in str(value) for value in row)


def test_an_unreadable_file_is_a_store_error_naming_it(tmp_path: Path) -> None:
    db_path(tmp_path).write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(db_path(tmp_path))):
        SQLiteKeyStore(tmp_path)


def test_a_closed_sqlite_store_names_its_file(tmp_path: Path) -> None:
    store = SQLiteKeyStore(tmp_path)
    store.close()
    with pytest.raises(StoreError, match=f"{db_path(tmp_path)} is closed; open a new SQLiteKeyStore"):
        store.list()


# --- the hook ------------------------------------------------------------------------------------


def test_the_default_store_is_sqlite_in_the_home_or_memory_with_the_memory_journal(tmp_path: Path) -> None:
    with make_system(config={"home": str(tmp_path / "home")}) as system:
        store = system.plugins.open_key_store(system.config)
        try:
            assert isinstance(store, SQLiteKeyStore) and store.path == db_path(system.config.home)
        finally:
            store.close()
    with make_system(config={"journal": {"backend": "memory"}}) as system:
        store = system.plugins.open_key_store(system.config)
        assert isinstance(store, MemoryKeyStore)
        store.close()


def test_a_plugin_store_comes_before_the_default_and_none_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = MemoryKeyStore()

    class Keys:
        @hookimpl
        def agentkeel_open_key_store(self, config: Any) -> KeyStore:
            return mine

    with make_system(Keys()) as system:
        assert system.plugins.open_key_store(system.config) is mine
        assert system.plugins.hook.agentkeel_open_key_store(config=system.config) is mine
    monkeypatch.setenv("AGENTKEEL_DISABLE_PLUGINS", "agentkeel.permissions.keys_default")
    with make_system() as system, pytest.raises(PluginError, match="agentkeel_open_key_store"):
        system.plugins.open_key_store(system.config)
