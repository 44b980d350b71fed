"""The memory store kept in the process (``[memory] backend = "memory"``): for tests and
benchmarks. Same promises as the SQLite store; lexical search ranks by BM25 in Python."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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


class InProcessMemoryStore:
    """``MemoryStore`` in the process; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._turns: list[Turn] = []
        self._records: list[Record] = []
        self._words: dict[int, Counter[str]] = {}
        self._summaries: dict[tuple[str, str], Summary] = {}
        self._profile: dict[tuple[str, str], ProfileFact] = {}
        self._vectors: dict[tuple[int, str], Any] = {}  # (record id, model) -> unit float32 vector
        self._next_turn = 1
        self._next_record = 1

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            if self._closed:
                raise StoreError("the in-process memory store is closed")
            return fn()

    def save_exchange(
        self, user_id: str, session_id: str, run_id: str, message: str, answer: str, *, status: str = "",
        record: str | None = None, ts: float = 0.0,
    ) -> None:
        now = ts or time.time()

        def write() -> None:
            for role, content in (("user", message), ("assistant", answer)):
                self._turns.append(Turn(self._next_turn, user_id, session_id, run_id, role, content, now, status))
                self._next_turn += 1
            if record is not None:
                rec = Record(self._next_record, user_id, session_id, run_id, record, now)
                self._next_record += 1
                self._records.append(rec)
                self._words[rec.id] = Counter(words(record))

        self._locked(write)

    def recent_turns(self, user_id: str, session_id: str, *, limit: int, after_id: int = 0) -> list[Turn]:
        return self._locked(lambda: [
            t for t in reversed(self._turns) if t.user_id == user_id and t.session_id == session_id and t.id > after_id
        ][:limit])

    def search(self, user_id: str, query: str, *, limit: int, exclude_runs: Iterable[str] = ()) -> list[Hit]:
        terms = query_terms(query)
        excluded = set(exclude_runs)
        if not terms or limit <= 0:
            return []

        def find() -> list[Hit]:
            mine = [r for r in self._records if r.user_id == user_id]
            if not mine:
                return []
            lengths = {r.id: sum(self._words[r.id].values()) for r in mine}
            avg = sum(lengths.values()) / len(mine)
            freqs = [sum(1 for r in mine if self._words[r.id][t]) for t in terms]
            hits = []
            for r in mine:
                if r.run_id in excluded:
                    continue
                score = bm25([self._words[r.id][t] for t in terms], lengths[r.id], freqs, len(mine), avg)
                if score > 0:
                    hits.append(Hit(r, score))
            hits.sort(key=lambda h: (-h.score, -h.record.id))
            return hits[:limit]

        return self._locked(find)

    def records(self, user_id: str, *, limit: int = 100) -> list[Record]:
        return self._locked(lambda: [r for r in reversed(self._records) if r.user_id == user_id][:limit])

    def save_vectors(self, user_id: str, model: str, vectors: Mapping[int, Sequence[float]]) -> int:
        if not vectors:
            return 0
        ids = list(vectors)
        matrix = unit_vectors([vectors[i] for i in ids])

        def write() -> int:
            mine = {r.id for r in self._records if r.user_id == user_id}
            stored = 0
            for n, rid in enumerate(ids):
                if rid in mine and (rid, model) not in self._vectors:
                    self._vectors[(rid, model)] = matrix[n]
                    stored += 1
            return stored

        return self._locked(write)

    def unembedded(self, user_id: str, model: str, *, limit: int) -> list[Record]:
        return self._locked(lambda: [r for r in reversed(self._records)
                                     if r.user_id == user_id and (r.id, model) not in self._vectors][:max(0, limit)])

    def nearest(
        self, user_id: str, model: str, vector: Sequence[float], *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        query = unit_vectors([vector])[0]
        excluded = set(exclude_runs)

        def find() -> list[Hit]:
            mine = [(r, self._vectors[(r.id, model)]) for r in self._records
                    if r.user_id == user_id and r.run_id not in excluded and (r.id, model) in self._vectors
                    and self._vectors[(r.id, model)].shape == query.shape]
            if not mine or limit <= 0:
                return []
            matrix = numpy_module().stack([v for _, v in mine])
            return [Hit(mine[i][0], score) for i, score in cosine_top_k(matrix, query, limit)]

        return self._locked(find)

    def summary(self, user_id: str, session_id: str) -> Summary | None:
        return self._locked(lambda: self._summaries.get((user_id, session_id)))

    def save_summary(self, summary: Summary) -> bool:
        def write() -> bool:
            key = (summary.user_id, summary.session_id)
            stored = self._summaries.get(key)
            if stored is not None and stored.upto_turn_id >= summary.upto_turn_id:
                return False
            self._summaries[key] = attrs.evolve(summary, ts=summary.ts or time.time())
            return True

        return self._locked(write)

    def set_fact(self, user_id: str, key: str, value: str, *, run_id: str) -> ProfileFact | None:
        check_fact(key, value)

        def write() -> ProfileFact | None:
            previous = self._profile.get((user_id, key))
            self._profile[(user_id, key)] = ProfileFact(user_id, key, value, run_id, time.time())
            return previous

        return self._locked(write)

    def delete_fact(self, user_id: str, key: str) -> ProfileFact | None:
        return self._locked(lambda: self._profile.pop((user_id, key), None))

    def profile(self, user_id: str) -> list[ProfileFact]:
        return self._locked(lambda: sorted((f for f in self._profile.values() if f.user_id == user_id),
                                           key=lambda f: f.key))

    def sessions(self, user_id: str) -> list[SessionInfo]:
        def list_() -> list[SessionInfo]:
            by: dict[str, list[Turn]] = {}
            for t in self._turns:
                if t.user_id == user_id:
                    by.setdefault(t.session_id, []).append(t)
            out = []
            for sid, turns in by.items():
                summary = self._summaries.get((user_id, sid))
                out.append(SessionInfo(sid, len(turns), min(t.ts for t in turns), max(t.ts for t in turns),
                                       summary.upto_turn_id if summary else 0))
            return sorted(out, key=lambda s: (-s.last_ts, s.session_id))

        return self._locked(list_)

    def users(self) -> list[str]:
        return self._locked(lambda: sorted(
            {t.user_id for t in self._turns} | {r.user_id for r in self._records}
            | {u for u, _ in self._profile} | {u for u, _ in self._summaries}))

    def forget(self, user_id: str, *, session_id: str | None = None, before: float | None = None) -> ForgetReport:
        def match(uid: str, sid: str | None, ts: float) -> bool:
            return (uid == user_id and (session_id is None or sid == session_id)
                    and (before is None or ts < before))

        return self._locked(lambda: self._delete(match, profile=session_id is None))

    def expire(self, before: float) -> ForgetReport:
        return self._locked(lambda: self._delete(lambda _u, _s, ts: ts < before, profile=True))

    def _delete(self, match: Callable[[str, str | None, float], bool], *, profile: bool) -> ForgetReport:
        n_turns, n_records = len(self._turns), len(self._records)
        self._turns = [t for t in self._turns if not match(t.user_id, t.session_id, t.ts)]
        gone = [r for r in self._records if match(r.user_id, r.session_id, r.ts)]
        self._records = [r for r in self._records if not match(r.user_id, r.session_id, r.ts)]
        gone_ids = {r.id for r in gone}
        for r in gone:
            self._words.pop(r.id, None)
        vectors = [key for key in self._vectors if key[0] in gone_ids]
        for key in vectors:
            del self._vectors[key]
        summaries = [k for k, s in self._summaries.items() if match(s.user_id, s.session_id, s.ts)]
        for k in summaries:
            del self._summaries[k]
        facts = [k for k, f in self._profile.items() if match(f.user_id, None, f.ts)] if profile else []
        for k in facts:
            del self._profile[k]
        return ForgetReport(n_turns - len(self._turns), n_records - len(self._records), len(summaries), len(facts),
                            len(vectors))

    def vacuum(self) -> None:
        self._locked(lambda: None)

    def close(self) -> None:
        with self._lock:
            self._closed = True

