"""The in-process memory store's indexes: random interleavings of writes, deletions and reads
give what a plain scan of all the data gives, and a search scores only the user's records
that hold a query term, however much other users hold."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest
from agentkeel.memory import memory_store
from agentkeel.memory.memory_store import InProcessMemoryStore
from agentkeel.memory.store import ForgetReport, Hit, Record, SessionInfo, Summary, Turn, bm25, query_terms, words

VOCABULARY = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
USERS = ["ann", "bob", "cy", "dee"]
SESSIONS = ["s1", "s2", "s3"]
MODELS = ["m1", "m2"]


class Reference:
    """The store as a plain list of everything, read by scanning it all (the algorithm the
    in-process store had before it was indexed)."""

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.records: list[Record] = []
        self.summaries: dict[tuple[str, str], Summary] = {}
        self.facts: dict[tuple[str, str], float] = {}  # (user, key) -> ts
        self.vectors: dict[tuple[int, str], Any] = {}
        self.next_turn = 1
        self.next_record = 1

    def save_exchange(self, user: str, session: str, run: str, message: str, answer: str, record: str | None,
                      ts: float) -> None:
        for role, content in (("user", message), ("assistant", answer)):
            self.turns.append(Turn(self.next_turn, user, session, run, role, content, ts, ""))
            self.next_turn += 1
        if record is not None:
            self.records.append(Record(self.next_record, user, session, run, record, ts))
            self.next_record += 1

    def recent_turns(self, user: str, session: str, limit: int, after_id: int) -> list[Turn]:
        return [t for t in reversed(self.turns)
                if t.user_id == user and t.session_id == session and t.id > after_id][:limit]

    def search(self, user: str, query: str, limit: int, exclude_runs: Iterable[str]) -> list[Hit]:
        terms = query_terms(query)
        excluded = set(exclude_runs)
        if not terms or limit <= 0:
            return []
        mine = [r for r in self.records if r.user_id == user]
        if not mine:
            return []
        counted = {r.id: Counter(words(r.text)) for r in mine}
        lengths = {r.id: sum(counted[r.id].values()) for r in mine}
        avg = sum(lengths.values()) / len(mine)
        freqs = [sum(1 for r in mine if counted[r.id][t]) for t in terms]
        hits = []
        for r in mine:
            if r.run_id in excluded:
                continue
            score = bm25([counted[r.id][t] for t in terms], lengths[r.id], freqs, len(mine), avg)
            if score > 0:
                hits.append(Hit(r, score))
        hits.sort(key=lambda h: (-h.score, -h.record.id))
        return hits[:limit]

    def list_records(self, user: str, limit: int) -> list[Record]:
        return [r for r in reversed(self.records) if r.user_id == user][:limit]

    def unembedded(self, user: str, model: str, limit: int) -> list[Record]:
        return [r for r in reversed(self.records)
                if r.user_id == user and (r.id, model) not in self.vectors][:max(0, limit)]

    def save_vectors(self, user: str, model: str, vectors: dict[int, list[float]]) -> int:
        from agentkeel.memory.vectors import unit_vectors

        ids = list(vectors)
        matrix = unit_vectors([vectors[i] for i in ids])
        mine = {r.id for r in self.records if r.user_id == user}
        stored = 0
        for n, rid in enumerate(ids):
            if rid in mine and (rid, model) not in self.vectors:
                self.vectors[(rid, model)] = matrix[n]
                stored += 1
        return stored

    def nearest(self, user: str, model: str, vector: list[float], limit: int,
                exclude_runs: Iterable[str]) -> list[Hit]:
        from agentkeel.memory.vectors import cosine_top_k, numpy_module, unit_vectors

        query = unit_vectors([vector])[0]
        excluded = set(exclude_runs)
        mine = [(r, self.vectors[(r.id, model)]) for r in self.records
                if r.user_id == user and r.run_id not in excluded and (r.id, model) in self.vectors
                and self.vectors[(r.id, model)].shape == query.shape]
        if not mine or limit <= 0:
            return []
        matrix = numpy_module().stack([v for _, v in mine])
        return [Hit(mine[i][0], score) for i, score in cosine_top_k(matrix, query, limit)]

    def sessions(self, user: str) -> list[SessionInfo]:
        by: dict[str, list[Turn]] = {}
        for t in self.turns:
            if t.user_id == user:
                by.setdefault(t.session_id, []).append(t)
        out = []
        for sid, turns in by.items():
            summary = self.summaries.get((user, sid))
            out.append(SessionInfo(sid, len(turns), min(t.ts for t in turns), max(t.ts for t in turns),
                                   summary.upto_turn_id if summary else 0))
        return sorted(out, key=lambda s: (-s.last_ts, s.session_id))

    def users(self) -> list[str]:
        return sorted({t.user_id for t in self.turns} | {r.user_id for r in self.records}
                      | {u for u, _ in self.facts} | {u for u, _ in self.summaries})

    def delete(self, user: str | None, session: str | None, before: float | None, *, profile: bool) -> ForgetReport:
        def match(uid: str, sid: str | None, ts: float) -> bool:
            return ((user is None or uid == user) and (session is None or sid == session)
                    and (before is None or ts < before))

        n_turns, n_records = len(self.turns), len(self.records)
        self.turns = [t for t in self.turns if not match(t.user_id, t.session_id, t.ts)]
        gone = {r.id for r in self.records if match(r.user_id, r.session_id, r.ts)}
        self.records = [r for r in self.records if r.id not in gone]
        vectors = [key for key in self.vectors if key[0] in gone]
        for key in vectors:
            del self.vectors[key]
        summaries = [k for k, s in self.summaries.items() if match(s.user_id, s.session_id, s.ts)]
        for k in summaries:
            del self.summaries[k]
        facts = [k for k, ts in self.facts.items() if match(k[0], None, ts)] if profile else []
        for k in facts:
            del self.facts[k]
        return ForgetReport(n_turns - len(self.turns), n_records - len(self.records), len(summaries), len(facts),
                            len(vectors))


def check_indexes(store: InProcessMemoryStore) -> None:
    """Every index of every user is what rebuilding it from the user's records gives, and
    nothing is left of a user who holds nothing (a look inside: what no read shows)."""
    for user in store._users.values():
        assert not user.empty()
        assert list(user.records) == sorted(user.records)
        assert sorted(rid for s in user.sessions.values() for rid in s.records) == list(user.records)
        postings: dict[str, dict[int, int]] = {}
        for rid, rec in user.records.items():
            for term, tf in Counter(words(rec.text)).items():
                postings.setdefault(term, {})[rid] = tf
        assert user.postings == postings
        assert user.lengths == {rid: len(words(r.text)) for rid, r in user.records.items()}
        assert user.total_len == sum(user.lengths.values())
        assert set(user.term_counts) == set(user.records)
        assert all(by_id and set(by_id) <= set(user.records) for by_id in user.vectors.values())
        for session in user.sessions.values():
            assert session.turns or session.records
            assert [t.id for t in session.turns] == sorted(t.id for t in session.turns)
            if session.turns:
                assert (session.first_ts, session.last_ts) == (min(t.ts for t in session.turns),
                                                               max(t.ts for t in session.turns))
        held = ([t.ts for s in user.sessions.values() for t in s.turns] + [s.ts for s in user.summaries.values()]
                + [f.ts for f in user.profile.values()])
        assert all(user.oldest <= ts for ts in held)


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 6)))


def query(rng: random.Random) -> str:
    picked = [rng.choice([*VOCABULARY, "absent", "ALPHA", "beta?"]) for _ in range(rng.randint(0, 3))]
    return rng.choice([" ", ", ", " OR "]).join(picked)


@pytest.mark.parametrize("seed", range(12))
def test_random_interleavings_read_what_a_full_scan_reads(seed: int) -> None:
    np = pytest.importorskip("numpy")
    del np
    rng = random.Random(seed)
    store, ref = InProcessMemoryStore(), Reference()
    runs: list[str] = []
    try:
        for step in range(400):
            user, session = rng.choice(USERS), rng.choice(SESSIONS)
            action = rng.random()
            if action < 0.40:
                run = f"r{step}"
                runs.append(run)
                record = text(rng) if rng.random() < 0.8 else None
                ts = float(rng.randint(1, 100))  # not in write order, with ties
                store.save_exchange(user, session, run, f"q{step}", f"a{step}", record=record, ts=ts)
                ref.save_exchange(user, session, run, f"q{step}", f"a{step}", record, ts)
            elif action < 0.44:
                assert store.forget(user, session_id=session) == ref.delete(user, session, None, profile=False)
            elif action < 0.47:
                cut = float(rng.randint(1, 100))
                assert store.forget(user, before=cut) == ref.delete(user, None, cut, profile=True)
            elif action < 0.49:
                cut = float(rng.randint(1, 100))
                assert (store.forget(user, session_id=session, before=cut)
                        == ref.delete(user, session, cut, profile=False))
            elif action < 0.50:
                assert store.forget(user) == ref.delete(user, None, None, profile=True)
            elif action < 0.53:
                cut = float(rng.randint(1, 60))
                assert store.expire(cut) == ref.delete(None, None, cut, profile=True)
            elif action < 0.56:
                upto = rng.randint(0, 50)
                summary = Summary(user, session, "sum", upto_turn_id=upto, ts=float(rng.randint(1, 100)))
                stored = ref.summaries.get((user, session))
                expected = stored is None or stored.upto_turn_id < upto
                if expected:
                    ref.summaries[(user, session)] = summary
                assert store.save_summary(summary) is expected
            elif action < 0.58:
                key = rng.choice(["name", "tier"])
                store.set_fact(user, key, "v", run_id="r")
                fact = store.profile(user)[[f.key for f in store.profile(user)].index(key)]
                ref.facts[(user, key)] = fact.ts
            elif action < 0.59:
                key = rng.choice(["name", "tier"])
                assert (store.delete_fact(user, key) is not None) == ((user, key) in ref.facts)
                ref.facts.pop((user, key), None)
            elif action < 0.64:
                model = rng.choice(MODELS)
                own = [r.id for r in ref.records if r.user_id == user]
                candidates = own + own + [r.id for r in ref.records] + [10_000]  # mostly the user's own
                picked = {rid: [float(rng.randint(-1, 1)), float(rng.randint(1, 2))]  # with ties
                          for rid in rng.sample(candidates, min(len(candidates), rng.randint(1, 6)))}
                assert store.save_vectors(user, model, picked) == ref.save_vectors(user, model, picked)
            elif action < 0.68:
                model, limit = rng.choice(MODELS), rng.randint(0, 6)
                vector = [float(rng.randint(-1, 1)), 1.0]
                excluded = rng.sample(runs, min(len(runs), rng.randint(0, 3)))
                assert (store.nearest(user, model, vector, limit=limit, exclude_runs=excluded)
                        == ref.nearest(user, model, vector, limit, excluded))
                assert (store.unembedded(user, model, limit=limit - 1)
                        == ref.unembedded(user, model, limit - 1))
            else:
                q, limit = query(rng), rng.randint(0, 8)
                excluded = rng.sample(runs, min(len(runs), rng.randint(0, 3)))
                assert (store.search(user, q, limit=limit, exclude_runs=excluded)
                        == ref.search(user, q, limit, excluded))
                limit, after = rng.randint(-2, 12), rng.choice([0, 0, rng.randint(0, 2 * step + 2)])
                assert (store.recent_turns(user, session, limit=limit, after_id=after)
                        == ref.recent_turns(user, session, limit, after))
                limit = rng.randint(-2, 12)
                assert store.records(user, limit=limit) == ref.list_records(user, limit)
                assert store.sessions(user) == ref.sessions(user)
                assert store.users() == ref.users()
            check_indexes(store)
        assert sum(1 for _ in ref.vectors) > 0  # the interleaving did embed some records
        for user in USERS:  # and at the end, everything of everyone
            for q in (" ".join(VOCABULARY), "alpha", "theta eta"):
                assert store.search(user, q, limit=1000) == ref.search(user, q, 1000, ())
            for session in SESSIONS:
                assert store.recent_turns(user, session, limit=10_000) == ref.recent_turns(user, session, 10_000, 0)
            assert store.records(user, limit=10_000) == ref.list_records(user, 10_000)
            assert store.sessions(user) == ref.sessions(user)
            for model in MODELS:
                assert store.unembedded(user, model, limit=10_000) == ref.unembedded(user, model, 10_000)
        assert store.users() == ref.users()
        assert store.expire(1e18) == ref.delete(None, None, 1e18, profile=True)
        assert store.users() == [] and not store._users
    finally:
        store.close()


def test_a_search_scores_only_the_users_records_that_hold_a_query_term(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def counting_bm25(*args: Any, **kwargs: Any) -> float:
        nonlocal calls
        calls += 1
        return bm25(*args, **kwargs)

    monkeypatch.setattr(memory_store, "bm25", counting_bm25)
    store = InProcessMemoryStore()
    try:
        texts = ["turquoise door", "red door", "turquoise sea turquoise", "green field", "blue sky",
                 "a lock code", "the team meeting", "lunch on friday", "sea and sky", "turquoise lock"]
        for i, t in enumerate(texts):
            store.save_exchange("ann", f"s{i % 3}", f"ann-{i}", "q", "a", record=t)
        holding = {"turquoise lock": sum("turquoise" in t.split() or "lock" in t.split() for t in texts)}

        def scored(query: str) -> int:
            nonlocal calls
            calls = 0
            hits = store.search("ann", query, limit=3)
            assert all(h.record.user_id == "ann" for h in hits)
            return calls

        alone = scored("turquoise lock")
        assert alone == holding["turquoise lock"] == 4
        for n in range(3000):  # other users, many of whose records hold the query terms
            store.save_exchange(f"u{n % 300}", "s", f"o{n}", "q", "a", record="turquoise lock and door")
        assert scored("turquoise lock") == alone
        assert scored("absent") == 0
        # the user's own records without a query term are not scored either
        for i in range(500):
            store.save_exchange("ann", "s9", f"ann-more-{i}", "q", "a", record="nothing to see")
        assert scored("turquoise lock") == alone
        store.forget("ann", session_id="s0")  # "turquoise door", "green field", "the team meeting", ...
        left = [t for i, t in enumerate(texts) if i % 3 != 0]
        assert scored("turquoise lock") == sum("turquoise" in t.split() or "lock" in t.split() for t in left)
    finally:
        store.close()
