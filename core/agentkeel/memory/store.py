"""What the memory manager keeps, behind one small protocol.

Per user, a memory store holds:

- **turns**: the session history, one row per message (``role`` "user" or
  "assistant"), in the order they were written (``id`` grows);
- **summaries**: per (user, session), one running summary of the turns up to
  ``upto_turn_id``, used instead of them;
- **records**: what a finished turn taught (message, answer, compact facts),
  retrievable by ``search`` across every session of the same user, ranked
  lexically (BM25 over ``query_terms``);
- **profile**: durable key/value facts about the user, with the run that wrote
  each one (provenance);
- **vectors**: per record and embedding model, the record's embedding (unit
  length), retrievable by ``nearest`` (cosine similarity), for semantic retrieval.

A user never reads another user's rows, and a session never reads another
session's turns (records are shared across the sessions of one user, by design).
``forget`` really deletes (rows gone, the full-text index updated, a forgotten
record's vectors gone with it).

Backends: ``agentkeel.memory.sqlite_store.SQLiteMemoryStore`` (``<home>/agentkeel.db``,
FTS5) and ``agentkeel.memory.memory_store.InProcessMemoryStore``. Both pass
``tests/memory/conformance.py``. Methods raise ``StoreError`` when the store
cannot be used; the memory manager turns that into an empty context and a warning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ForgetReport",
    "Hit",
    "MemoryStore",
    "ProfileFact",
    "Record",
    "SessionInfo",
    "Summary",
    "Turn",
    "query_terms",
]

MAX_QUERY_TERMS = 32
"""At most this many distinct terms of a query are searched for."""

MAX_KEY_CHARS = 100
MAX_VALUE_CHARS = 2000

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Every lower-cased word of ``text``, in order (what the lexical index counts)."""
    return _WORD.findall(text.lower())


def query_terms(text: str, *, limit: int = MAX_QUERY_TERMS) -> list[str]:
    """The distinct lower-cased words of ``text`` (letters, digits, underscore), in order,
    at most ``limit``. Both backends search for these, so they rank the same words; no
    character of the query reaches a query language."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(text.lower()):
        if word not in seen:
            seen[word] = None
            if len(seen) >= limit:
                break
    return list(seen)


def check_fact(key: object, value: object) -> None:
    """Raise ``ValueError`` naming the problem when a profile fact is not storable."""
    if not isinstance(key, str) or not key.strip():
        raise ValueError(f"a profile key must be a non-empty string, got {key!r}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"a profile key is at most {MAX_KEY_CHARS} characters, got {len(key)}")
    if not isinstance(value, str):
        raise ValueError(f"the value of profile key {key!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"the value of profile key {key!r} is at most {MAX_VALUE_CHARS} characters, "
                         f"got {len(value)}")


@attrs.frozen
class Turn:
    id: int
    user_id: str
    session_id: str
    run_id: str
    role: str
    content: str
    ts: float
    status: str = ""


@attrs.frozen
class Record:
    """One retrievable memory: what one finished turn taught."""

    id: int
    user_id: str
    session_id: str
    run_id: str
    text: str
    ts: float


@attrs.frozen
class Hit:
    """A record found by ``search``; ``score`` > 0, higher is better."""

    record: Record
    score: float


@attrs.frozen
class Summary:
    """The running summary of a session's turns with ``id <= upto_turn_id``.

    ``source``: "extractive" (built without a model) or "llm".
    """

    user_id: str
    session_id: str
    text: str
    upto_turn_id: int
    run_id: str = ""
    source: str = "extractive"
    ts: float = 0.0


@attrs.frozen
class ProfileFact:
    user_id: str
    key: str
    value: str
    run_id: str
    ts: float


@attrs.frozen
class SessionInfo:
    session_id: str
    turns: int
    first_ts: float
    last_ts: float
    summarised_upto: int = 0


@attrs.frozen
class ForgetReport:
    """How many rows ``forget`` deleted, of each kind."""

    turns: int = 0
    records: int = 0
    summaries: int = 0
    profile: int = 0
    embeddings: int = 0

    @property
    def total(self) -> int:
        return self.turns + self.records + self.summaries + self.profile + self.embeddings

    def __add__(self, other: ForgetReport) -> ForgetReport:
        return ForgetReport(self.turns + other.turns, self.records + other.records,
                            self.summaries + other.summaries, self.profile + other.profile,
                            self.embeddings + other.embeddings)


@runtime_checkable
class MemoryStore(Protocol):
    """The memory manager's store. ``ts`` 0 means "now" by the store's clock."""

    def save_exchange(
        self,
        user_id: str,
        session_id: str,
        run_id: str,
        message: str,
        answer: str,
        *,
        status: str = "",
        record: str | None = None,
        ts: float = 0.0,
    ) -> None:
        """Store the user's message and the assistant's answer as two turns, and
        ``record`` (when not None) as a retrievable record: all in one transaction."""
        ...

    def recent_turns(self, user_id: str, session_id: str, *, limit: int, after_id: int = 0) -> list[Turn]:
        """The session's newest ``limit`` turns with ``id > after_id``, newest first."""
        ...

    def summary(self, user_id: str, session_id: str) -> Summary | None:
        """The session's running summary, if any."""
        ...

    def save_summary(self, summary: Summary) -> bool:
        """Store ``summary`` when it covers more turns than the stored one (``upto_turn_id``
        larger, or none stored); False when a summary as new or newer is already there
        (another writer got there first), which is not an error."""
        ...

    def search(
        self, user_id: str, query: str, *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        """The user's records best matching ``query`` (BM25 over ``query_terms``), best first,
        at most ``limit``, leaving out records of ``exclude_runs``. No terms: no hits."""
        ...

    def save_vectors(self, user_id: str, model: str, vectors: Mapping[int, Sequence[float]]) -> int:
        """Store the embeddings ``model`` made of the user's records (record id -> vector), as
        unit vectors. Records that are gone, or another user's, are skipped; a record keeps the
        vector of ``model`` it has. Returns how many were stored. ``ValueError`` naming the problem
        when a vector is not equal-length finite numbers, or is all zeros."""
        ...

    def unembedded(self, user_id: str, model: str, *, limit: int) -> list[Record]:
        """The user's records without a vector of ``model``, newest first, at most ``limit``."""
        ...

    def nearest(
        self, user_id: str, model: str, vector: Sequence[float], *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        """The user's records whose ``model`` vectors (of the same length as ``vector``) are most
        similar to it, best first (``Hit.score``: cosine similarity, -1 to 1), at most ``limit``,
        leaving out records of ``exclude_runs``."""
        ...

    def set_fact(self, user_id: str, key: str, value: str, *, run_id: str) -> ProfileFact | None:
        """Set a profile fact (``check_fact`` rules); returns the fact it replaced, if any."""
        ...

    def delete_fact(self, user_id: str, key: str) -> ProfileFact | None:
        """Delete one profile fact; returns it, or None when there was none."""
        ...

    def profile(self, user_id: str) -> list[ProfileFact]:
        """The user's profile facts, by key."""
        ...

    def sessions(self, user_id: str) -> list[SessionInfo]:
        """The user's sessions that have turns, most recently used first."""
        ...

    def records(self, user_id: str, *, limit: int = 100) -> list[Record]:
        """The user's records, newest first."""
        ...

    def users(self) -> list[str]:
        """Every user with anything stored, sorted."""
        ...

    def forget(self, user_id: str, *, session_id: str | None = None, before: float | None = None) -> ForgetReport:
        """Delete what is kept of a user: everything, or only ``session_id`` (its turns,
        summary and records; profile facts belong to the user, not a session), or only
        rows older than ``before``. The full-text index and the vectors forget them too."""
        ...

    def expire(self, before: float) -> ForgetReport:
        """Delete every user's rows older than ``before`` (``[memory] ttl_days``)."""
        ...

    def vacuum(self) -> None:
        """Give the space of deleted rows back (a no-op where nothing is kept on disk)."""
        ...

    def close(self) -> None:
        """Release the store; using it afterwards raises ``StoreError``. Idempotent."""
        ...


def bm25(
    term_freqs: Sequence[int], doc_len: int, doc_freqs: Sequence[int], n_docs: int, avg_len: float,
    *, k1: float = 1.2, b: float = 0.75,
) -> float:
    """Okapi BM25 of one document for the query terms (with the non-negative idf of Lucene)."""
    score = 0.0
    for tf, df in zip(term_freqs, doc_freqs, strict=True):
        if tf == 0:
            continue
        idf = math.log((n_docs - df + 0.5) / (df + 0.5) + 1.0)
        score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * doc_len / (avg_len or 1.0)))
    return score
