"""The memory store kept in the process (``[memory] backend = "memory"``): for tests and
benchmarks. Same promises as the SQLite store; lexical search ranks by BM25 in Python.

Everything is indexed by user, so no operation on one user looks at another user's data
(only ``users`` and ``expire`` go over every user): a session's turns are kept in id
order (``recent_turns`` reads the newest few), a user's records in id order (``records``,
``unembedded``), and an inverted index of each user's records (term -> record id -> term
frequency, with the number of records and their total length) lets ``search`` score
only the records that hold a query term. Every write and every deletion path keeps the
indexes consistent."""

from __future__ import annotations

import heapq
import threading
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any, TypeVar

import attrs

from agentkeel.errors import StoreError
from agentkeel.memory.store import (
    ForgetReport,
    Hit,
    ProfileFact,
    Record,
    SessionInfo,
    Summary,
    Turn,
    bm25,
    check_fact,
    query_terms,
    words,
)
from agentkeel.memory.vectors import cosine_top_k, numpy_module, unit_vectors

__all__ = ["InProcessMemoryStore"]

_T = TypeVar("_T")


def _turn_id(turn: Turn) -> int:
    return turn.id


def _lowest(values: Iterable[float], start: float) -> float:
    """The smallest of ``values`` and ``start`` (NaNs never count: they match no ``ts < before``)."""
    low = start
    for v in values:
        if v < low:
            low = v
    return low


class _Session:
    """One (user, session): its turns (ids increase, so the newest are at the end), the
    first and last turn times (as ``min``/``max`` over the turns in id order), and the
    ids of its records, in id order."""

    __slots__ = ("first_ts", "last_ts", "records", "turns")

    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.first_ts = 0.0
        self.last_ts = 0.0
        self.records: list[int] = []

    def add_turn(self, turn: Turn) -> None:
        if not self.turns:
            self.first_ts = self.last_ts = turn.ts
        else:  # what min()/max() over the turns in order would give
            if turn.ts < self.first_ts:
                self.first_ts = turn.ts
            if turn.ts > self.last_ts:
                self.last_ts = turn.ts
        self.turns.append(turn)

    def set_turns(self, turns: list[Turn]) -> None:
        self.turns = turns
        if turns:
            self.first_ts = min(t.ts for t in turns)
            self.last_ts = max(t.ts for t in turns)


class _User:
    """Everything the store holds for one user, with its indexes."""

    __slots__ = ("lengths", "oldest", "postings", "profile", "records", "sessions", "summaries", "term_counts",
                 "total_len", "vectors")

    def __init__(self) -> None:
        self.sessions: dict[str, _Session] = {}
        self.records: dict[int, Record] = {}  # record id -> record, in id order
        self.term_counts: dict[int, Counter[str]] = {}  # record id -> its words, counted
        self.lengths: dict[int, int] = {}  # record id -> number of words
        self.total_len = 0  # sum of lengths
        self.postings: dict[str, dict[int, int]] = {}  # term -> record id -> frequency (> 0)
        self.summaries: dict[str, Summary] = {}  # session id -> summary
        self.profile: dict[str, ProfileFact] = {}  # key -> fact
        self.vectors: dict[str, dict[int, Any]] = {}  # model -> record id -> unit float32 vector
        # a lower bound of the ts of everything held (exact after a pass over all of it):
        # ``expire`` skips the users with nothing older than its cut
        self.oldest = float("inf")

    def empty(self) -> bool:
        return not (self.sessions or self.records or self.summaries or self.profile)

    def seen(self, ts: float) -> None:
        if ts < self.oldest:
            self.oldest = ts

    def add_record(self, rec: Record) -> None:
        counts = Counter(words(rec.text))
        length = sum(counts.values())
        self.records[rec.id] = rec
        self.term_counts[rec.id] = counts
        self.lengths[rec.id] = length
        self.total_len += length
        for term, tf in counts.items():
            self.postings.setdefault(term, {})[rec.id] = tf

    def drop_record(self, rid: int) -> int:
        """Remove record ``rid`` from every index but its session's; the number of its vectors."""
        del self.records[rid]
        for term in self.term_counts.pop(rid):
            posting = self.postings[term]
            del posting[rid]
            if not posting:
                del self.postings[term]
        self.total_len -= self.lengths.pop(rid)
        vectors = 0
        for model in list(self.vectors):
            by_id = self.vectors[model]
            if rid in by_id:
                del by_id[rid]
                vectors += 1
                if not by_id:
                    del self.vectors[model]
        return vectors

    def recompute_oldest(self) -> None:
        low = float("inf")
        for s in self.sessions.values():
            low = _lowest((t.ts for t in s.turns), low)
        low = _lowest((r.ts for r in self.records.values()), low)
        low = _lowest((s.ts for s in self.summaries.values()), low)
        self.oldest = _lowest((f.ts for f in self.profile.values()), low)

    def delete(self, session_id: str | None, before: float | None, *, profile: bool) -> ForgetReport:
        """Delete what is in ``session_id`` (None: every session) and older than ``before``
        (None: whatever its time), and the profile facts too when ``profile``."""

        def old(ts: float) -> bool:
            return before is None or ts < before

        sids = list(self.sessions) if session_id is None else [session_id]
        n_turns = n_records = n_vectors = 0
        for sid in sids:
            session = self.sessions.get(sid)
            if session is None:
                continue
            kept = [t for t in session.turns if not old(t.ts)]
            if len(kept) != len(session.turns):
                n_turns += len(session.turns) - len(kept)
                session.set_turns(kept)
            kept_records = []
            for rid in session.records:
                if old(self.records[rid].ts):
                    n_vectors += self.drop_record(rid)
                    n_records += 1
                else:
                    kept_records.append(rid)
            session.records = kept_records
            if not session.turns and not session.records:
                del self.sessions[sid]
        summaries = [sid for sid in (list(self.summaries) if session_id is None else [session_id])
                     if sid in self.summaries and old(self.summaries[sid].ts)]
        for sid in summaries:
            del self.summaries[sid]
        facts = [k for k, f in self.profile.items() if old(f.ts)] if profile else []
        for k in facts:
            del self.profile[k]
        if session_id is None:  # everything was looked at: the bound can be made exact
            self.recompute_oldest()
        return ForgetReport(n_turns, n_records, len(summaries), len(facts), n_vectors)


class InProcessMemoryStore:
    """``MemoryStore`` in the process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._users: dict[str, _User] = {}  # no entry for a user who holds nothing
        self._next_turn = 1
        self._next_record = 1

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError("the in-process memory store is closed")
            return fn()

    def _user(self, user_id: str) -> _User:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User()
        return user

    def _drop_if_empty(self, user_id: str, user: _User) -> None:
        if user.empty():
            self._users.pop(user_id, None)

    def save_exchange(
        self, user_id: str, session_id: str, run_id: str, message: str, answer: str, *, status: str = "",
        record: str | None = None, ts: float = 0.0,
    ) -> None:
        now = ts or time.time()

        def write() -> None:
            user = self._user(user_id)
            session = user.sessions.get(session_id)
            if session is None:
                session = user.sessions[session_id] = _Session()
            for role, content in (("user", message), ("assistant", answer)):
                session.add_turn(Turn(self._next_turn, user_id, session_id, run_id, role, content, now, status))
                self._next_turn += 1
            user.seen(now)
            if record is not None:
                rec = Record(self._next_record, user_id, session_id, run_id, record, now)
                self._next_record += 1
                user.add_record(rec)
                session.records.append(rec.id)

        self._locked(write)

    def recent_turns(self, user_id: str, session_id: str, *, limit: int, after_id: int = 0) -> list[Turn]:
        def read() -> list[Turn]:
            user = self._users.get(user_id)
            session = user.sessions.get(session_id) if user is not None else None
            if session is None:
                return []
            turns = session.turns
            first = bisect_right(turns, after_id, key=_turn_id)  # turns[first:] have id > after_id
            if limit >= 0:
                return turns[max(first, len(turns) - limit):][::-1]
            return turns[first:][::-1][:limit]

        return self._locked(read)

    def search(self, user_id: str, query: str, *, limit: int, exclude_runs: Iterable[str] = ()) -> list[Hit]:
        terms = query_terms(query)
        excluded = set(exclude_runs)
        if not terms or limit <= 0:
            return []

        def find() -> list[Hit]:
            user = self._users.get(user_id)
            if user is None or not user.records:
                return []
            n_docs = len(user.records)
            avg = user.total_len / n_docs
            postings = [user.postings.get(t, {}) for t in terms]
            freqs = [len(p) for p in postings]
            # a record without any query term scores 0 and is never a hit: score only the others
            candidates: set[int] = set()
            for p in postings:
                candidates.update(p)
            scored = []
            for rid in candidates:
                rec = user.records[rid]
                if rec.run_id in excluded:
                    continue
                score = bm25([p.get(rid, 0) for p in postings], user.lengths[rid], freqs, n_docs, avg)
                if score > 0:
                    scored.append((score, rid))
            top = heapq.nsmallest(limit, scored, key=lambda sr: (-sr[0], -sr[1]))
            return [Hit(user.records[rid], score) for score, rid in top]

        return self._locked(find)

    def records(self, user_id: str, *, limit: int = 100) -> list[Record]:
        def read() -> list[Record]:
            user = self._users.get(user_id)
            if user is None:
                return []
            newest_first = reversed(user.records.values())
            if limit >= 0:
                return list(islice(newest_first, limit))
            return list(newest_first)[:limit]

        return self._locked(read)

    def save_vectors(self, user_id: str, model: str, vectors: Mapping[int, Sequence[float]]) -> int:
        if not vectors:
            return 0
        ids = list(vectors)
        matrix = unit_vectors([vectors[i] for i in ids])

        def write() -> int:
            user = self._users.get(user_id)
            if user is None:
                return 0
            by_id = user.vectors.get(model, {})
            stored = 0
            for n, rid in enumerate(ids):
                if rid in user.records and rid not in by_id:
                    by_id[rid] = matrix[n]
                    stored += 1
            if by_id:
                user.vectors[model] = by_id
            return stored

        return self._locked(write)

    def unembedded(self, user_id: str, model: str, *, limit: int) -> list[Record]:
        def read() -> list[Record]:
            user = self._users.get(user_id)
            if user is None:
                return []
            by_id = user.vectors.get(model, {})
            return list(islice((r for r in reversed(user.records.values()) if r.id not in by_id), max(0, limit)))

        return self._locked(read)

    def nearest(
        self, user_id: str, model: str, vector: Sequence[float], *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        query = unit_vectors([vector])[0]
        excluded = set(exclude_runs)

        def find() -> list[Hit]:
            user = self._users.get(user_id)
            by_id = user.vectors.get(model) if user is not None else None
            if user is None or not by_id:
                return []
            # rows in record id order, as cosine_top_k breaks ties by row
            mine = [(user.records[rid], v) for rid, v in sorted(by_id.items(), key=lambda kv: kv[0])
                    if user.records[rid].run_id not in excluded and v.shape == query.shape]
            if not mine or limit <= 0:
                return []
            matrix = numpy_module().stack([v for _, v in mine])
            return [Hit(mine[i][0], score) for i, score in cosine_top_k(matrix, query, limit)]

        return self._locked(find)

    def summary(self, user_id: str, session_id: str) -> Summary | None:
        def read() -> Summary | None:
            user = self._users.get(user_id)
            return user.summaries.get(session_id) if user is not None else None

        return self._locked(read)

    def save_summary(self, summary: Summary) -> bool:
        def write() -> bool:
            user = self._users.get(summary.user_id)
            stored = user.summaries.get(summary.session_id) if user is not None else None
            if stored is not None and stored.upto_turn_id >= summary.upto_turn_id:
                return False
            user = self._user(summary.user_id)
            saved = user.summaries[summary.session_id] = attrs.evolve(summary, ts=summary.ts or time.time())
            user.seen(saved.ts)
            return True

        return self._locked(write)

    def set_fact(self, user_id: str, key: str, value: str, *, run_id: str) -> ProfileFact | None:
        check_fact(key, value)

        def write() -> ProfileFact | None:
            user = self._user(user_id)
            previous = user.profile.get(key)
            fact = user.profile[key] = ProfileFact(user_id, key, value, run_id, time.time())
            user.seen(fact.ts)
            return previous

        return self._locked(write)

    def delete_fact(self, user_id: str, key: str) -> ProfileFact | None:
        def write() -> ProfileFact | None:
            user = self._users.get(user_id)
            if user is None:
                return None
            fact = user.profile.pop(key, None)
            self._drop_if_empty(user_id, user)
            return fact

        return self._locked(write)

    def profile(self, user_id: str) -> list[ProfileFact]:
        def read() -> list[ProfileFact]:
            user = self._users.get(user_id)
            return sorted(user.profile.values(), key=lambda f: f.key) if user is not None else []

        return self._locked(read)

    def sessions(self, user_id: str) -> list[SessionInfo]:
        def list_() -> list[SessionInfo]:
            user = self._users.get(user_id)
            if user is None:
                return []
            out = []
            for sid, session in user.sessions.items():
                if not session.turns:
                    continue
                summary = user.summaries.get(sid)
                out.append(SessionInfo(sid, len(session.turns), session.first_ts, session.last_ts,
                                       summary.upto_turn_id if summary else 0))
            return sorted(out, key=lambda s: (-s.last_ts, s.session_id))

        return self._locked(list_)

    def users(self) -> list[str]:
        return self._locked(lambda: sorted(u for u, user in self._users.items() if not user.empty()))

    def forget(self, user_id: str, *, session_id: str | None = None, before: float | None = None) -> ForgetReport:
        def delete() -> ForgetReport:
            user = self._users.get(user_id)
            if user is None:
                return ForgetReport()
            report = user.delete(session_id, before, profile=session_id is None)
            self._drop_if_empty(user_id, user)
            return report

        return self._locked(delete)

    def expire(self, before: float) -> ForgetReport:
        def delete() -> ForgetReport:
            report = ForgetReport()
            for user_id, user in list(self._users.items()):
                if user.oldest < before:  # else nothing of this user is older than ``before``
                    report += user.delete(None, before, profile=True)
                    self._drop_if_empty(user_id, user)
            return report

        return self._locked(delete)

    def vacuum(self) -> None:
        self._locked(lambda: None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
