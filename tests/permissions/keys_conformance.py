"""The conformance suite of the ``agentkeel.permissions.keys.KeyStore`` protocol, for every backend.

Use it by subclassing ``KeyStoreConformance`` in a ``test_*.py`` module, as a
``Test...`` class, and defining two fixtures:

- ``make_store``: a callable ``(clock=time.time) -> KeyStore`` that opens a store on
  this test's state (empty at first). The fixture closes every store it opened.
  When the backend is shared (``SHARED = True``: SQLite), every store it opens is
  a new handle on the same state; otherwise each is a state of its own.
- ``stored``: a callable ``(store) -> bytes`` giving everything the backend holds
  (for SQLite, the bytes of the database file and its WAL, and a dump of it), to
  check that no secret ever reaches it.

Each test is written so that a backend getting its promise wrong fails it: a
secret stored, a state leaked to a wrong token, a first revocation overwritten,
an order by id instead of by time, a write on every request.
"""

from __future__ import annotations

import hashlib
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from agentkeel.errors import StoreError
from agentkeel.permissions.keys import (
    LAST_USED_RESOLUTION_S,
    MAX_NAME_LENGTH,
    MAX_SECRET_LENGTH,
    ApiKey,
    AuthResult,
    KeyStore,
    new_secret,
    parse_secret,
)

MakeStore = Callable[..., KeyStore]
Stored = Callable[[KeyStore], bytes]

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
SECRET_SHAPE = re.compile(r"ak_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def token_of(secret: str) -> str:
    parsed = parse_secret(secret)
    assert parsed is not None, secret
    return parsed[1]


def key_id_of(secret: str) -> str:
    parsed = parse_secret(secret)
    assert parsed is not None, secret
    return parsed[0]


def with_token(secret: str, token: str) -> str:
    """``secret`` with its token replaced (same key id)."""
    return f"ak_{key_id_of(secret)}_{token}"


def other_token(secret: str) -> str:
    """A well-formed token that is not ``secret``'s (one character changed)."""
    token = token_of(secret)
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def malformed_secrets(valid: str) -> list[Any]:
    """Shapes of input that are not a secret, built around the valid secret ``valid``."""
    key_id, token = key_id_of(valid), token_of(valid)
    return [
        "", " ", "ak_", "ak__", "ak", "Bearer " + valid, valid + " ", " " + valid, valid + "\n", valid + "\x00",
        "AK_" + valid[3:], "sk_" + valid[3:], "ak-" + valid[3:], "ak_" + key_id + "-" + token,
        "ak_" + key_id.upper() + "_" + token if key_id.upper() != key_id else "ak_ABCDEF012345_" + token,
        "ak_" + key_id[:-1] + "_" + token,  # an 11-character id
        "ak_" + key_id + "0_" + token,  # a 13-character id
        "ak_" + key_id[:-1] + "g_" + token,  # not hex
        "ak_" + key_id + "_" + token[:-1],  # a 42-character token
        "ak_" + key_id + "_" + token + "A",  # a 44-character token
        "ak_" + key_id + "_" + token[:-1] + "=",  # base64 padding
        "ak_" + key_id + "_" + token[:-1] + "+",  # the standard, not the URL-safe, alphabet
        "ak_" + key_id + "_" + token[:-1] + "/",
        "ak_" + key_id + "_",  # no token
        "ak__" + token,  # no id
        "ak_" + "\u0661" * 12 + "_" + token,  # Arabic-Indic digits: \d would take them
        "ak_" + key_id + "_" + token[:-1] + "\u00e9",  # non-ASCII
        "ak_" + key_id + "_" + token[:-1] + "\ud800",  # a lone surrogate
        "\uff41\uff4b_" + key_id + "_" + token,  # fullwidth "ak"
        valid + valid,
        valid * 4,  # over the cap
        valid + "x" * (MAX_SECRET_LENGTH - len(valid) + 1),  # one past the cap
        "ak_" + key_id + "_" + "A" * 10**6,  # huge
        "a" * 10**7,  # very huge
        None, 7, b"ak_000000000000_" + b"A" * 43, valid.encode(), ["ak_"], {"key": valid},
    ]


class KeyStoreConformance:
    """The tests every ``KeyStore`` backend must pass (see the module docstring)."""

    SHARED: ClassVar[bool] = False
    """Whether two stores from ``make_store`` are handles on one state."""

    # --- create and authenticate ------------------------------------------------------------

    def test_create_returns_a_secret_that_authenticates_to_its_principal(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        assert isinstance(store, KeyStore)
        secret, key = store.create("alice", name="ci bot")
        assert SECRET_SHAPE.fullmatch(secret), secret
        assert key == ApiKey(key_id=key_id_of(secret), principal="alice", name="ci bot", created_at=T0,
                             expires_at=None, revoked_at=None, rate_limit=None, last_used_at=None)
        other, bob = store.create("bob")
        assert other != secret and bob.key_id != key.key_id and bob.name == ""
        result = store.authenticate(secret)
        assert isinstance(result, AuthResult)
        assert result.reason == "ok" and result.ok
        assert result.key is not None and result.key.principal == "alice" and result.key.key_id == key.key_id
        second = store.authenticate(other)
        assert second.key is not None and second.key.principal == "bob"
        assert store.get(key.key_id) == result.key  # what authenticate returned is what is stored

    def test_secrets_are_fresh_and_random(self, make_store: MakeStore) -> None:
        store = make_store()
        secrets = [store.create("alice")[0] for _ in range(50)]
        assert len(set(secrets)) == 50
        assert len({key_id_of(s) for s in secrets}) == 50
        assert len({token_of(s) for s in secrets}) == 50

    def test_the_store_never_holds_the_secret(self, make_store: MakeStore, stored: Stored) -> None:
        store = make_store(clock=FakeClock())
        made = [store.create(principal, name=f"key {i}") for i, principal in enumerate(["alice", "bob", "alice"])]
        store.revoke(made[1][1].key_id, now=T0 + 1)
        assert store.authenticate(made[0][0], now=T0 + 2).ok
        held = stored(store)
        for secret, key in made:
            token = token_of(secret)
            assert secret.encode() not in held
            assert token.encode() not in held
            assert token[:20].encode() not in held  # not a prefix of it either
            # what is held is the hash (so `stored` does see the store's contents)
            assert hashlib.sha256(token.encode()).hexdigest().encode() in held
            assert key.key_id.encode() in held

    def test_to_dict_holds_the_record_and_no_secret(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        secret, key = store.create("alice", name="n", expires_at=T0 + 60, rate_limit=2.0)
        data = key.to_dict()
        assert data == {"key_id": key.key_id, "principal": "alice", "name": "n", "created_at": T0,
                        "expires_at": T0 + 60, "revoked_at": None, "rate_limit": 2.0, "last_used_at": None}
        text = repr(data)
        token = token_of(secret)
        assert token not in text and hashlib.sha256(token.encode()).hexdigest() not in text

    # --- refusals ---------------------------------------------------------------------------

    def test_malformed_secrets_are_refused_as_malformed(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        secret, _ = store.create("alice")
        for shape in malformed_secrets(secret):
            result = store.authenticate(shape)
            assert result == AuthResult(None, "malformed key"), repr(shape)[:80]
        assert store.authenticate(secret).ok  # the valid one still is

    def test_huge_input_is_refused_without_work(self, make_store: MakeStore) -> None:
        store = make_store()
        huge = "ak_" + "a" * 50_000_000
        started = time.perf_counter()
        assert store.authenticate(huge).reason == "malformed key"
        assert time.perf_counter() - started < 0.05  # capped before any scan of it

    def test_an_unknown_key_id_is_an_unknown_key(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        store.create("alice")
        never_stored, _, _ = new_secret()
        assert store.authenticate(never_stored) == AuthResult(None, "unknown key")
        assert store.authenticate("ak_000000000000_" + "A" * 43) == AuthResult(None, "unknown key")

    def test_a_wrong_token_for_a_known_id_is_an_unknown_key(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        secret, key = store.create("alice", expires_at=T0 + 10)
        wrong = with_token(secret, other_token(secret))
        assert store.authenticate(wrong) == AuthResult(None, "unknown key")
        fresh = with_token(secret, token_of(new_secret()[0]))
        assert store.authenticate(fresh) == AuthResult(None, "unknown key")
        # the state of a key is told only to whoever holds its token
        store.revoke(key.key_id)
        assert store.authenticate(wrong) == AuthResult(None, "unknown key")
        assert store.authenticate(wrong, now=T0 + 20) == AuthResult(None, "unknown key")
        assert store.authenticate(secret) == AuthResult(None, "revoked")

    def test_a_revoked_key_is_refused_as_revoked(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        secret, key = store.create("alice")
        other, _ = store.create("alice")
        clock.advance(5)
        revoked = store.revoke(key.key_id)
        assert revoked.revoked_at == T0 + 5 and revoked.state_at(T0 + 5) == "revoked"
        assert store.authenticate(secret) == AuthResult(None, "revoked")
        assert store.authenticate(secret, now=T0 + 86400 * 365) == AuthResult(None, "revoked")
        assert store.authenticate(other).ok  # only that key
        assert store.get(key.key_id) == revoked

    def test_an_expired_key_is_refused_as_expired(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        secret, key = store.create("alice", expires_at=T0 + 10)
        assert key.expires_at == T0 + 10 and key.state_at(T0 + 9.999) == "active"
        assert store.authenticate(secret, now=T0 + 9.999).ok
        assert store.authenticate(secret, now=T0 + 10) == AuthResult(None, "expired")  # from expires_at on
        clock.advance(3600)
        assert store.authenticate(secret) == AuthResult(None, "expired")
        assert key.state_at(T0 + 10) == "expired"
        # revoked wins over expired
        store.revoke(key.key_id)
        assert store.authenticate(secret) == AuthResult(None, "revoked")
        assert store.get(key.key_id).state_at(clock.now) == "revoked"  # type: ignore[union-attr]

    # --- revoke -----------------------------------------------------------------------------

    def test_revoking_twice_keeps_the_first_revocation(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        secret, key = store.create("alice", name="twice")
        first = store.revoke(key.key_id, now=T0 + 1)
        again = store.revoke(key.key_id, now=T0 + 2)
        assert first.revoked_at == again.revoked_at == T0 + 1
        assert again == first == store.get(key.key_id)
        assert again.name == "twice" and again.principal == "alice"
        assert store.authenticate(secret) == AuthResult(None, "revoked")

    def test_revoking_an_unknown_key_is_a_lookup_error(self, make_store: MakeStore) -> None:
        store = make_store()
        with pytest.raises(LookupError, match="no API key 0123456789ab"):
            store.revoke("0123456789ab")
        with pytest.raises(LookupError, match="no API key "):
            store.revoke("")
        assert store.list() == []

    # --- get and list -----------------------------------------------------------------------

    def test_get_returns_the_record_or_none(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        _, key = store.create("alice", name="g")
        assert store.get(key.key_id) == key
        assert store.get("0" * 12) is None
        assert store.get("") is None
        assert store.get("'; DROP TABLE api_keys; --") is None
        assert store.get(key.key_id) == key

    def test_list_is_newest_first_and_filters_by_principal(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        _, a1 = store.create("alice", name="a1", now=T0 + 1)
        _, b1 = store.create("bob", name="b1", now=T0 + 2)
        _, a0 = store.create("alice", name="a0", now=T0)  # created later, but dated earlier
        _, a3 = store.create("alice", name="a3", now=T0 + 3)
        _, a3b = store.create("alice", name="a3b", now=T0 + 3)  # the same instant: the later one first
        store.revoke(a1.key_id, now=T0 + 4)
        names = [k.name for k in store.list()]
        assert names == ["a3b", "a3", "b1", "a1", "a0"]
        assert [k.name for k in store.list("alice")] == ["a3b", "a3", "a1", "a0"]  # revoked ones included
        assert [k.key_id for k in store.list("bob")] == [b1.key_id]
        assert store.list("carol") == []
        assert store.list(None) == store.list()
        assert {k.key_id for k in store.list()} == {a1.key_id, b1.key_id, a0.key_id, a3.key_id, a3b.key_id}

    # --- validation -------------------------------------------------------------------------

    @pytest.mark.parametrize(("field", "value"), [
        ("principal", ""), ("principal", "   "), ("principal", None), ("principal", 7), ("principal", "al\ud800"),
        ("name", None), ("name", 5), ("name", "x" * (MAX_NAME_LENGTH + 1)), ("name", "bad\udcff"),
        ("expires_at", T0 - 1), ("expires_at", T0), ("expires_at", math.nan), ("expires_at", math.inf),
        ("expires_at", -math.inf), ("expires_at", "tomorrow"), ("expires_at", True), ("expires_at", 10**400),
        ("rate_limit", 0), ("rate_limit", 0.0), ("rate_limit", -1.0), ("rate_limit", math.nan),
        ("rate_limit", math.inf), ("rate_limit", True), ("rate_limit", "5"),
    ])
    def test_invalid_fields_are_refused_naming_the_field(self, make_store: MakeStore, field: str,
                                                         value: Any) -> None:
        store = make_store(clock=FakeClock())
        fields: dict[str, Any] = {"principal": "alice", "name": "", "expires_at": None, "rate_limit": None}
        fields[field] = value
        principal = fields.pop("principal")
        with pytest.raises(ValueError, match=field.split("_")[0]):
            store.create(principal, **fields)
        assert store.list() == []  # nothing stored

    def test_the_longest_name_and_odd_text_are_kept(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        name = "é" * MAX_NAME_LENGTH
        _, key = store.create("alice", name=name)
        _, quoted = store.create("o'brien \"x\"", name="'; DROP TABLE api_keys; --")
        assert store.get(key.key_id) == key and key.name == name
        assert store.get(quoted.key_id) == quoted
        assert [k.key_id for k in store.list("o'brien \"x\"")] == [quoted.key_id]

    def test_a_bad_now_is_refused(self, make_store: MakeStore) -> None:
        store = make_store()
        with pytest.raises(ValueError, match="now"):
            store.create("alice", now=math.nan)
        secret, key = store.create("alice")
        with pytest.raises(ValueError, match="now"):
            store.revoke(key.key_id, now=math.inf)
        assert store.authenticate(secret).ok

    # --- round trips ------------------------------------------------------------------------

    def test_rate_limit_and_expiry_round_trip(self, make_store: MakeStore) -> None:
        store = make_store(clock=FakeClock())
        secret, key = store.create("alice", rate_limit=2.5, expires_at=T0 + 1234.5)
        assert key.rate_limit == 2.5 and key.expires_at == T0 + 1234.5
        _, whole = store.create("alice", rate_limit=3)
        _, tiny = store.create("alice", rate_limit=0.001)
        assert whole.rate_limit == 3.0 and isinstance(whole.rate_limit, float)
        assert store.get(whole.key_id) == whole
        assert store.get(tiny.key_id).rate_limit == 0.001  # type: ignore[union-attr]
        stored = store.get(key.key_id)
        assert stored is not None and stored.rate_limit == 2.5 and stored.expires_at == T0 + 1234.5
        result = store.authenticate(secret)
        assert result.key is not None and result.key.rate_limit == 2.5
        _, unlimited = store.create("alice")
        assert store.get(unlimited.key_id).rate_limit is None  # type: ignore[union-attr]

    def test_a_successful_authentication_sets_last_used_at_at_most_once_a_second(
        self, make_store: MakeStore
    ) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        secret, key = store.create("alice")
        assert key.last_used_at is None
        clock.advance(5)
        first = store.authenticate(secret)
        assert first.key is not None and first.key.last_used_at == T0 + 5
        assert store.get(key.key_id).last_used_at == T0 + 5  # type: ignore[union-attr]
        clock.advance(LAST_USED_RESOLUTION_S / 2)
        within = store.authenticate(secret)
        assert within.ok and within.key is not None and within.key.last_used_at == T0 + 5  # not written again
        assert store.get(key.key_id).last_used_at == T0 + 5  # type: ignore[union-attr]
        clock.advance(LAST_USED_RESOLUTION_S)
        later = store.authenticate(secret)
        assert later.key is not None and later.key.last_used_at == clock.now
        assert store.get(key.key_id).last_used_at == clock.now  # type: ignore[union-attr]

    def test_a_refused_authentication_does_not_touch_last_used_at(self, make_store: MakeStore) -> None:
        clock = FakeClock()
        store = make_store(clock=clock)
        secret, key = store.create("alice", expires_at=T0 + 100)
        clock.advance(10)
        assert store.authenticate(with_token(secret, other_token(secret))).reason == "unknown key"
        assert store.get(key.key_id).last_used_at is None  # type: ignore[union-attr]
        clock.advance(100)
        assert store.authenticate(secret).reason == "expired"
        assert store.get(key.key_id).last_used_at is None  # type: ignore[union-attr]
        store.revoke(key.key_id)
        assert store.authenticate(secret).reason == "revoked"
        assert store.get(key.key_id).last_used_at is None  # type: ignore[union-attr]

    def test_the_clock_is_used_when_no_now_is_given(self, make_store: MakeStore) -> None:
        clock = FakeClock(T0 + 42)
        store = make_store(clock=clock)
        _, key = store.create("alice")
        assert key.created_at == T0 + 42
        clock.advance(1)
        assert store.revoke(key.key_id).revoked_at == T0 + 43
        _, real = make_store().create("bob")  # the real clock by default
        assert abs(real.created_at - time.time()) < 60

    # --- handles, threads, close ------------------------------------------------------------

    def test_a_second_handle_sees_what_the_first_did(self, make_store: MakeStore) -> None:
        if not self.SHARED:
            pytest.skip("this backend keeps its state in one handle")
        clock = FakeClock()
        first, second = make_store(clock=clock), make_store(clock=clock)
        secret, key = first.create("alice", name="shared", rate_limit=4.0)
        assert second.get(key.key_id) == key
        assert second.authenticate(secret).ok
        assert first.get(key.key_id).last_used_at == T0  # type: ignore[union-attr]
        clock.advance(2)
        first.revoke(key.key_id)
        assert second.authenticate(secret) == AuthResult(None, "revoked")
        assert second.revoke(key.key_id).revoked_at == T0 + 2  # the first revocation stays
        other, _ = second.create("bob")
        assert [k.principal for k in first.list()] == ["bob", "alice"]
        assert first.authenticate(other).ok
        first.close()
        assert second.authenticate(other).ok  # closing one handle leaves the other open

    def test_concurrent_creates_and_authentications(self, make_store: MakeStore) -> None:
        store = make_store()
        made: list[tuple[str, ApiKey]] = []
        failures: list[BaseException] = []
        lock = threading.Lock()

        def work(n: int) -> None:
            try:
                for i in range(20):
                    secret, key = store.create(f"p{n}", name=str(i))
                    result = store.authenticate(secret)
                    assert result.key is not None and result.key.key_id == key.key_id
                    with lock:
                        made.append((secret, key))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures
        assert len(made) == 160 and len({key.key_id for _, key in made}) == 160
        assert len(store.list()) == 160 and len(store.list("p3")) == 20

    def test_close_is_idempotent_and_a_closed_store_refuses_calls(self, make_store: MakeStore) -> None:
        store = make_store()
        secret, key = store.create("alice")
        store.close()
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.authenticate(secret)
        with pytest.raises(StoreError, match="closed"):
            store.create("alice")
        with pytest.raises(StoreError, match="closed"):
            store.list()
        with pytest.raises(StoreError, match="closed"):
            store.get(key.key_id)
        with pytest.raises(StoreError, match="closed"):
            store.revoke(key.key_id)
