"""The memory store conformance suite: every ``MemoryStore`` backend must pass it.

A backend's test module subclasses ``MemoryStoreConformance`` and provides a
``store`` fixture (and ``reopen``, a second store on the same data, where the
backend is shared between store objects; None otherwise).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from agentkeel.errors import StoreError
from agentkeel.memory.store import MemoryStore, Summary

HOSTILE_QUERIES = [
    'turquoise OR "x" *', "NEAR(turquoise colour)", "owner: anything", "user_id:ann", '"', '""', "*", "-", "^",
    "colour)", "(", "AND OR NOT", "😀 ünïcödé turquoise", "", "   ", "x" * 10_000, "\x00turquoise", "'; DROP TABLE",
]


class MemoryStoreConformance:
    """What every memory store promises."""

    reopen: Callable[[], MemoryStore] | None = None

    def test_turns_newest_first_with_limit_and_after(self, store: MemoryStore) -> None:
        for i in range(3):
            store.save_exchange("ann", "s1", f"r{i}", f"q{i}", f"a{i}", status="succeeded")
        turns = store.recent_turns("ann", "s1", limit=10)
        assert [t.content for t in turns] == ["a2", "q2", "a1", "q1", "a0", "q0"]
        assert [t.role for t in turns[:2]] == ["assistant", "user"]
        assert turns[0].status == "succeeded" and turns[0].run_id == "r2"
        assert [t.content for t in store.recent_turns("ann", "s1", limit=3)] == ["a2", "q2", "a1"]
        cut = turns[3].id  # q1
        assert [t.content for t in store.recent_turns("ann", "s1", limit=10, after_id=cut)] == ["a2", "q2", "a1"]

    def test_users_and_sessions_are_isolated(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "r1", "ann's secret", "ok", record="ann's secret")
        store.save_exchange("bob", "s1", "r2", "bob's note", "ok", record="bob's note")
        assert [t.content for t in store.recent_turns("bob", "s1", limit=10)] == ["ok", "bob's note"]
        assert store.recent_turns("ann", "s2", limit=10) == []
        assert store.recent_turns("carl", "s1", limit=10) == []
        assert [r.text for r in store.records("bob")] == ["bob's note"]

    @pytest.mark.parametrize("query", HOSTILE_QUERIES)
    def test_search_never_crosses_users_even_with_hostile_queries(self, store: MemoryStore, query: str) -> None:
        store.save_exchange("ann", "s1", "r1", "m", "a", record="my favourite colour is turquoise owner ann")
        store.save_exchange("bob", "s1", "r2", "m", "a", record="bob likes red")
        for hit in store.search("bob", query, limit=10):
            assert hit.record.user_id == "bob"
        assert store.search("bob", "my favourite colour is turquoise owner ann", limit=10) == []

    def test_search_ranks_matches_and_honours_limit_and_exclusions(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "r1", "m", "a", record="lunch with the team on friday")
        store.save_exchange("ann", "s2", "r2", "m", "a", record="my locker code is 4417, locker near the gym")
        store.save_exchange("ann", "s3", "r3", "m", "a", record="the team meeting moved")
        store.save_exchange("ann", "s4", "r4", "m", "a", record="nothing related at all")
        hits = store.search("ann", "which code opens my locker?", limit=5)
        assert hits and hits[0].record.run_id == "r2"
        assert all(h.score > 0 for h in hits)
        assert "r4" not in {h.record.run_id for h in hits}
        team = store.search("ann", "team", limit=5)
        assert {h.record.run_id for h in team} == {"r1", "r3"}
        assert len(store.search("ann", "team", limit=1)) == 1
        assert {h.record.run_id for h in store.search("ann", "team", limit=5, exclude_runs={"r1"})} == {"r3"}
        assert store.search("ann", "", limit=5) == []

    def test_excluded_runs_do_not_take_the_places_of_others(self, store: MemoryStore) -> None:
        # r1 holds the best two matches; leaving it out must still fill the limit from the rest
        store.save_exchange("ann", "s1", "r1", "m", "a", record="team team team")
        store.save_exchange("ann", "s1", "r1", "m", "a", record="team team")
        store.save_exchange("ann", "s2", "r3", "m", "a", record="the team meeting moved to friday")
        hits = store.search("ann", "team", limit=1, exclude_runs=["r1"])
        assert [h.record.run_id for h in hits] == ["r3"]
        assert store.search("ann", "team", limit=5, exclude_runs=["r1", "r3"]) == []

    def test_summary_is_compare_and_set(self, store: MemoryStore) -> None:
        assert store.summary("ann", "s1") is None
        assert store.save_summary(Summary("ann", "s1", "first", upto_turn_id=4, run_id="r1"))
        assert not store.save_summary(Summary("ann", "s1", "stale", upto_turn_id=4))
        assert not store.save_summary(Summary("ann", "s1", "older", upto_turn_id=2))
        assert store.save_summary(Summary("ann", "s1", "newer", upto_turn_id=9, source="llm"))
        got = store.summary("ann", "s1")
        assert got is not None and (got.text, got.upto_turn_id, got.source) == ("newer", 9, "llm")
        assert store.summary("bob", "s1") is None and store.summary("ann", "s2") is None

    def test_profile_facts_with_provenance(self, store: MemoryStore) -> None:
        assert store.set_fact("ann", "name", "Ann", run_id="r1") is None
        previous = store.set_fact("ann", "name", "Annie", run_id="r2")
        assert previous is not None and (previous.value, previous.run_id) == ("Ann", "r1")
        store.set_fact("ann", "tier", "gold", run_id="r3")
        assert [(f.key, f.value, f.run_id) for f in store.profile("ann")] == [("name", "Annie", "r2"),
                                                                             ("tier", "gold", "r3")]
        assert store.profile("bob") == []
        deleted = store.delete_fact("ann", "tier")
        assert deleted is not None and deleted.value == "gold"
        assert store.delete_fact("ann", "tier") is None

    @pytest.mark.parametrize(("key", "value", "problem"), [
        ("", "x", "non-empty"), ("  ", "x", "non-empty"), ("k" * 101, "x", "at most 100"),
        ("k", "v" * 2001, "at most 2000"), ("k", 5, "must be a string"),
    ])
    def test_bad_profile_facts_are_refused(self, store: MemoryStore, key: str, value: object, problem: str) -> None:
        with pytest.raises(ValueError, match=problem):
            store.set_fact("ann", key, value, run_id="r")  # type: ignore[arg-type]
        assert store.profile("ann") == []

    def test_forget_everything_of_a_user(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "r1", "q", "a", record="turquoise")
        store.save_exchange("ann", "s2", "r2", "q", "a", record="turquoise again")
        store.save_summary(Summary("ann", "s1", "sum", upto_turn_id=1))
        store.set_fact("ann", "name", "Ann", run_id="r1")
        store.save_exchange("bob", "s1", "r3", "q", "a", record="turquoise bob")
        gone = store.forget("ann")
        assert (gone.turns, gone.records, gone.summaries, gone.profile) == (4, 2, 1, 1)
        assert store.recent_turns("ann", "s1", limit=10) == [] and store.records("ann") == []
        assert store.search("ann", "turquoise", limit=5) == [] and store.profile("ann") == []
        assert store.summary("ann", "s1") is None and store.sessions("ann") == []
        assert [h.record.user_id for h in store.search("bob", "turquoise", limit=5)] == ["bob"]
        assert store.users() == ["bob"]
        store.vacuum()
        assert store.forget("ann").total == 0

    def test_forget_one_session_keeps_the_profile(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "r1", "q", "a", record="one")
        store.save_exchange("ann", "s2", "r2", "q", "a", record="two")
        store.save_summary(Summary("ann", "s1", "sum", upto_turn_id=1))
        store.set_fact("ann", "name", "Ann", run_id="r1")
        gone = store.forget("ann", session_id="s1")
        assert (gone.turns, gone.records, gone.summaries, gone.profile) == (2, 1, 1, 0)
        assert [r.text for r in store.records("ann")] == ["two"]
        assert len(store.profile("ann")) == 1

    def test_forget_before_and_expire(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "old", "q", "a", record="old words", ts=1000.0)
        store.save_exchange("ann", "s1", "new", "q", "a", record="new words", ts=5000.0)
        store.save_exchange("bob", "s1", "bob-old", "q", "a", record="old words", ts=1000.0)
        gone = store.forget("ann", before=2000.0)
        assert (gone.turns, gone.records) == (2, 1)
        assert [r.run_id for r in store.records("ann")] == ["new"]
        assert [h.record.run_id for h in store.search("ann", "words", limit=5)] == ["new"]
        expired = store.expire(2000.0)
        assert (expired.turns, expired.records) == (2, 1)
        assert store.records("bob") == []

    def test_sessions_and_users(self, store: MemoryStore) -> None:
        store.save_exchange("ann", "s1", "r1", "q", "a", ts=1000.0)
        store.save_exchange("ann", "s2", "r2", "q", "a", ts=2000.0)
        store.save_summary(Summary("ann", "s1", "sum", upto_turn_id=2))
        store.set_fact("zed", "k", "v", run_id="r")
        sessions = store.sessions("ann")
        assert [(s.session_id, s.turns, s.last_ts) for s in sessions] == [("s2", 2, 2000.0), ("s1", 2, 1000.0)]
        assert sessions[1].summarised_upto == 2
        assert store.users() == ["ann", "zed"]

    def test_concurrent_writers_lose_nothing(self, store: MemoryStore) -> None:
        stores = [store, self.reopen()] if self.reopen is not None else [store, store]
        errors: list[BaseException] = []

        def write(n: int) -> None:
            try:
                mine = stores[n % 2]
                for i in range(25):
                    mine.save_exchange(f"u{n}", "s", f"r{n}-{i}", f"q{i}", f"a{i}", record=f"word{n} item{i}")
                    mine.set_fact(f"u{n}", f"k{i}", "v", run_id=f"r{n}-{i}")
            except BaseException as exc:  # noqa: BLE001 (reported below)
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        for n in range(4):
            assert len(store.recent_turns(f"u{n}", "s", limit=1000)) == 50
            assert len(store.records(f"u{n}", limit=1000)) == 25
            assert len(store.profile(f"u{n}")) == 25
            assert len(store.search(f"u{n}", f"word{n}", limit=100)) == 25

    def test_a_closed_store_refuses(self, store: MemoryStore) -> None:
        store.close()
        store.close()  # idempotent
        with pytest.raises(StoreError):
            store.recent_turns("ann", "s1", limit=1)
        with pytest.raises(StoreError):
            store.save_exchange("ann", "s1", "r", "q", "a")

    # --- vectors (semantic retrieval) -------------------------------------------------

    def _records(self, store: MemoryStore, user: str, texts: list[str]) -> list[int]:
        for i, text in enumerate(texts):
            store.save_exchange(user, "s", f"{user}-r{i}", "q", "a", record=text)
        return [r.id for r in reversed(store.records(user, limit=1000))]

    def test_nearest_ranks_by_cosine_per_user_and_model(self, store: MemoryStore) -> None:
        pytest.importorskip("numpy")
        a, b, c = self._records(store, "ann", ["east", "north-east", "west"])
        (bob,) = self._records(store, "bob", ["bob east"])
        assert store.save_vectors("ann", "m1", {a: [1.0, 0.0], b: [1.0, 1.0], c: [-3.0, 0.0]}) == 3
        assert store.save_vectors("bob", "m1", {bob: [1.0, 0.0]}) == 1
        hits = store.nearest("ann", "m1", [2.0, 0.0], limit=5)
        assert [h.record.id for h in hits] == [a, b, c]
        assert [round(h.score, 4) for h in hits] == [1.0, 0.7071, -1.0]
        assert all(h.record.user_id == "ann" for h in hits)
        assert [h.record.id for h in store.nearest("bob", "m1", [1.0, 0.0], limit=5)] == [bob]
        assert store.nearest("ann", "m2", [1.0, 0.0], limit=5) == []  # another model's space
        assert store.nearest("ann", "m1", [1.0, 0.0, 0.0], limit=5) == []  # another length
        assert [h.record.id for h in store.nearest("ann", "m1", [1.0, 0.0], limit=1)] == [a]
        assert [h.record.id for h in store.nearest("ann", "m1", [1.0, 0.0], limit=5,
                                                   exclude_runs={"ann-r0"})] == [b, c]

    def test_vectors_of_another_users_records_are_refused(self, store: MemoryStore) -> None:
        pytest.importorskip("numpy")
        (bob,) = self._records(store, "bob", ["bob's secret"])
        assert store.save_vectors("ann", "m1", {bob: [1.0, 0.0], 999_999: [0.0, 1.0]}) == 0
        assert store.nearest("ann", "m1", [1.0, 0.0], limit=5) == []
        assert [r.id for r in store.unembedded("bob", "m1", limit=5)] == [bob]

    @pytest.mark.parametrize(("vectors", "problem"), [
        ([[1.0, 0.0], [1.0]], "equal-length"), ([[float("nan"), 1.0]], "finite"), ([[0.0, 0.0]], "zeros"),
        ([["x", 1.0]], "numbers"), ([[]], "1 to"),
    ])
    def test_bad_vectors_are_refused_and_nothing_is_stored(
        self, store: MemoryStore, vectors: list[list[object]], problem: str
    ) -> None:
        pytest.importorskip("numpy")
        ids = self._records(store, "ann", ["one", "two"])
        with pytest.raises(ValueError, match=problem):
            store.save_vectors("ann", "m1", dict(zip(ids, vectors, strict=False)))  # type: ignore[arg-type]
        assert len(store.unembedded("ann", "m1", limit=5)) == 2

    def test_unembedded_newest_first_and_a_vector_is_kept(self, store: MemoryStore) -> None:
        pytest.importorskip("numpy")
        a, b, c = self._records(store, "ann", ["one", "two", "three"])
        assert [r.id for r in store.unembedded("ann", "m1", limit=5)] == [c, b, a]
        store.save_vectors("ann", "m1", {b: [0.0, 1.0]})
        assert [r.id for r in store.unembedded("ann", "m1", limit=1)] == [c]
        assert store.save_vectors("ann", "m1", {b: [1.0, 0.0]}) == 0  # b keeps its vector
        assert store.nearest("ann", "m1", [0.0, 1.0], limit=1)[0].record.id == b
        assert [r.id for r in store.unembedded("ann", "m2", limit=5)] == [c, b, a]

    def test_forget_deletes_vectors_and_search_sees_new_ones_at_once(self, store: MemoryStore) -> None:
        pytest.importorskip("numpy")
        a, b = self._records(store, "ann", ["one", "two"])
        store.save_vectors("ann", "m1", {a: [1.0, 0.0], b: [0.0, 1.0]})
        assert len(store.nearest("ann", "m1", [1.0, 0.0], limit=5)) == 2  # warms any cache
        store.save_exchange("ann", "s2", "late", "q", "a", record="three")
        (c,) = [r.id for r in store.unembedded("ann", "m1", limit=5)]
        store.save_vectors("ann", "m1", {c: [1.0, 0.1]})
        assert [h.record.id for h in store.nearest("ann", "m1", [1.0, 0.0], limit=2)] == [a, c]
        gone = store.forget("ann", session_id="s2")
        assert gone.embeddings == 1
        assert [h.record.id for h in store.nearest("ann", "m1", [1.0, 0.0], limit=5)] == [a, b]
        gone = store.forget("ann")
        assert gone.embeddings == 2
        assert store.nearest("ann", "m1", [1.0, 0.0], limit=5) == []
        # a new record that takes a forgotten record's place has no vector until it is embedded
        self._records(store, "ann", ["four"])
        assert store.nearest("ann", "m1", [1.0, 0.0], limit=5) == []

    def test_another_store_on_the_same_data_sees_vectors_and_deletions(self, store: MemoryStore) -> None:
        pytest.importorskip("numpy")
        if self.reopen is None:
            pytest.skip("this backend is not shared between store objects")
        other = self.reopen()
        a, b = self._records(store, "ann", ["one", "two"])
        store.save_vectors("ann", "m1", {a: [1.0, 0.0]})
        assert [h.record.id for h in other.nearest("ann", "m1", [1.0, 0.0], limit=5)] == [a]
        store.save_vectors("ann", "m1", {b: [0.9, 0.1]})
        assert [h.record.id for h in other.nearest("ann", "m1", [1.0, 0.0], limit=5)] == [a, b]
        store.forget("ann")
        assert other.nearest("ann", "m1", [1.0, 0.0], limit=5) == []
