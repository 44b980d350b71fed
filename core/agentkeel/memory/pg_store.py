"""The shared memory store on PostgreSQL: tables ``memory_turns``, ``memory_summaries``,
``memory_records``, ``memory_profile`` and ``memory_vectors`` (``agentkeel.pg_schema.memory``),
selected by ``[store] url``, so every replica of the service reads the same memory.

Promises, on top of the ``agentkeel.memory.store.MemoryStore`` protocol (the semantics of
``SQLiteMemoryStore``, checked by ``tests/memory/conformance.py``):

- Safe across threads, processes and hosts: each call is one transaction on a pooled
  connection (``agentkeel.pg.database``, shared by every store on the URL); a write by one
  replica is seen by every other on its next call.
- Every statement names the user (``WHERE user_id = %s``): one user's rows are never read
  for another. A search's terms reach PostgreSQL only as bound parameters of
  ``plainto_tsquery('simple', %s)``, never as query syntax.
- Lexical search: the GIN index on ``memory_records.tsv`` (``to_tsvector('simple', terms)``,
  ``terms`` being the record's ``words``) finds the user's records holding any query term;
  they are ranked by Okapi BM25 in Python (``agentkeel.memory.store.bm25``) over the user's
  records (count, average length, and each term's document frequency among the matches),
  on the same words and with the same tie-break (newer first) as the in-process store, so
  the two give the same scores. (``ts_rank_cd`` has no idf: a word every record holds
  would count as much as a rare one.) As in SQLite, terms held by more than
  ``COMMON_SHARE`` of a user's records (and at least ``COMMON_MIN``) are left out of a
  search, unless all are that common (then the rarest is kept). ``exclude_runs`` is
  applied before ``limit``.
- ``forget`` and ``expire`` delete records and their vectors in one statement (and the
  foreign key deletes any vector written meanwhile); the full-text entry is a column of
  the record row, so it goes with it. ``ForgetReport`` counts the rows deleted.
- Vectors: the unit float32 bytes, as SQLite stores them; ``nearest`` ranks them with the
  same code as SQLite (``agentkeel.memory.vectors``: numpy, a matrix cached per user and
  model, checked on every search against (count, largest id) of the user's vectors). The
  check is sound because ``save_vectors`` takes a per-user advisory lock before its rows
  get their ids, so a user's vector ids become visible in increasing order.
- ``save_exchange`` takes a per-session advisory lock, so a session's turn ids become
  visible in increasing order (``after_id`` and a summary's ``upto_turn_id`` never skip a
  turn committed late).
- Orderings by text (profile keys, users, sessions of equal time) use the ``"C"`` collation:
  code-point order, as Python and SQLite sort.
- PostgreSQL text cannot hold NUL characters: a write with one in a text field is refused
  with ``NulTextError`` (a ``StoreError`` and a ``ValueError``) naming the field, writing
  nothing; a lookup with one finds nothing (nothing like it could be stored).
- A server that cannot be reached, or a statement that fails, raises ``StoreError`` naming
  the server (never its password) and what failed.
- ``vacuum`` runs ``VACUUM`` on the memory's tables on a connection of its own (it cannot
  run in a transaction). ``close`` closes this handle only (later use raises
  ``StoreError``); the pool is the process's, shared by every store on the URL.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg

import agentkeel.pg as pg
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
from agentkeel.memory.vectors import CachedMatrix, VectorCache, cosine_top_k, from_blobs, to_blob, unit_vectors

__all__ = ["NulTextError", "PostgresMemoryStore"]

_T = TypeVar("_T")
Conn = psycopg.Connection[Any]

COMMON_SHARE = 0.05
COMMON_MIN = 1000

_TABLES = ("memory_turns", "memory_summaries", "memory_records", "memory_profile", "memory_vectors")
_RECORD = "id, user_id, session_id, run_id, text, ts"
_INSERT_TURN = ("INSERT INTO memory_turns (user_id, session_id, run_id, role, content, status, ts) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)")
_SESSION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('agentkeel.memory.session:' || %s || ':' || %s, 0))"
_VECTOR_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('agentkeel.memory.vectors:' || %s, 0))"


class NulTextError(StoreError, ValueError):
    """A text to be stored holds a NUL character, which PostgreSQL text cannot store."""


def _check_text(what: str, **fields: str | None) -> None:
    for name, value in fields.items():
        if value is not None and "\x00" in value:
            raise NulTextError(f"cannot store {what}: its {name} holds a NUL character, "
                               "which PostgreSQL text cannot store")


def _storable(*texts: str) -> bool:
    """Whether PostgreSQL text can hold every one of ``texts`` (no NUL, valid UTF-8)."""
    for text in texts:
        if "\x00" in text:
            return False
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
    return True


def _record(row: Sequence[Any]) -> Record:
    rid, user_id, session_id, run_id, text, ts = row[:6]
    return Record(int(rid), user_id, session_id, run_id, text, float(ts))


def _fact(row: Sequence[Any]) -> ProfileFact:
    user_id, key, value, run_id, ts = row
    return ProfileFact(user_id, key, value, run_id, float(ts))


class PostgresMemoryStore:
    """``MemoryStore`` in the PostgreSQL database at ``url`` (migrated on first use).

    ``clock`` gives "now" for rows written without a time. Opening connects, so an
    unreachable server fails here.
    """

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.label = pg.redact(url)
        self._clock = clock
        self._closed = False
        self._lock = threading.Lock()
        self._vectors = VectorCache()
        self._run("open", lambda conn: None)

    def _check_open(self) -> None:
        with self._lock:
            if self._closed:
                raise StoreError(f"the memory store at {self.label} is closed; open a new PostgresMemoryStore")

    def _run(self, what: str, fn: Callable[[Conn], _T]) -> _T:
        self._check_open()
        try:
            return pg.database(self.url).run(what, fn)
        except psycopg.Error as exc:
            raise StoreError(f"the memory store at {self.label}: {what} failed: {exc}") from exc

    # --- turns and records ---------------------------------------------------

    def save_exchange(
        self, user_id: str, session_id: str, run_id: str, message: str, answer: str, *, status: str = "",
        record: str | None = None, ts: float = 0.0,
    ) -> None:
        _check_text("the exchange", user_id=user_id, session_id=session_id, run_id=run_id, message=message,
                    answer=answer, status=status, record=record)
        now = ts or self._clock()
        found = words(record) if record is not None else []

        def write(conn: Conn) -> None:
            conn.execute(_SESSION_LOCK, (user_id, session_id))
            with conn.cursor() as cur:
                cur.executemany(_INSERT_TURN, [(user_id, session_id, run_id, "user", message, status, now),
                                               (user_id, session_id, run_id, "assistant", answer, status, now)])
            if record is not None:
                conn.execute("INSERT INTO memory_records (user_id, session_id, run_id, text, ts, terms, length) "
                             "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                             (user_id, session_id, run_id, record, now, " ".join(found), len(found)))

        self._run("save the exchange", write)

    def recent_turns(self, user_id: str, session_id: str, *, limit: int, after_id: int = 0) -> list[Turn]:
        if not _storable(user_id, session_id) or limit <= 0:
            self._check_open()
            return []
        rows = self._run("read the recent turns", lambda conn: conn.execute(
            "SELECT id, user_id, session_id, run_id, role, content, ts, status FROM memory_turns "
            "WHERE user_id = %s AND session_id = %s AND id > %s ORDER BY id DESC LIMIT %s",
            (user_id, session_id, after_id, limit)).fetchall())
        return [Turn(int(r[0]), r[1], r[2], r[3], r[4], r[5], float(r[6]), r[7]) for r in rows]

    def search(self, user_id: str, query: str, *, limit: int, exclude_runs: Iterable[str] = ()) -> list[Hit]:
        terms = query_terms(query)
        if not terms or limit <= 0 or not _storable(user_id):
            self._check_open()
            return []
        excluded = set(exclude_runs)

        def find(conn: Conn) -> list[Hit]:
            stats = conn.execute("SELECT count(*), coalesce(avg(length), 0) FROM memory_records "
                                 "WHERE user_id = %s", (user_id,)).fetchone()
            n_docs, avg_len = (int(stats[0]), float(stats[1])) if stats else (0, 0.0)
            if n_docs == 0:
                return []
            chosen = self._selective(conn, user_id, terms, n_docs)
            matches = " || ".join(["plainto_tsquery('simple', %s)"] * len(chosen))
            rows = conn.execute(f"SELECT {_RECORD}, terms, length FROM memory_records "
                                f"WHERE user_id = %s AND tsv @@ ({matches})", (user_id, *chosen)).fetchall()
            counted = [(row, Counter(str(row[6]).split())) for row in rows]
            freqs = [sum(1 for _, c in counted if c[t]) for t in chosen]
            hits = []
            for row, count in counted:
                if row[3] in excluded:
                    continue
                score = bm25([count[t] for t in chosen], int(row[7]), freqs, n_docs, avg_len)
                if score > 0:
                    hits.append(Hit(_record(row), score))
            hits.sort(key=lambda h: (-h.score, -h.record.id))
            return hits[:limit]

        return self._run("search the records", find)

    @staticmethod
    def _selective(conn: Conn, user_id: str, terms: list[str], n_docs: int) -> list[str]:
        """The terms worth searching for: those held by at most ``COMMON_SHARE`` of the user's
        records (or ``COMMON_MIN``), unless every term is more common (then the rarest)."""
        cap = max(COMMON_MIN, int(n_docs * COMMON_SHARE))
        if n_docs <= cap:
            return terms
        counts = ", ".join(["count(*) FILTER (WHERE tsv @@ plainto_tsquery('simple', %s))"] * len(terms))
        row = conn.execute(f"SELECT {counts} FROM memory_records WHERE user_id = %s",
                           (*terms, user_id)).fetchone()
        docs = dict(zip(terms, (int(n) for n in row), strict=True)) if row else {}
        chosen = [t for t in terms if docs.get(t, 0) <= cap]
        return chosen or [min(terms, key=lambda t: docs.get(t, 0))]

    def records(self, user_id: str, *, limit: int = 100) -> list[Record]:
        if not _storable(user_id) or limit <= 0:
            self._check_open()
            return []
        rows = self._run("list the records", lambda conn: conn.execute(
            f"SELECT {_RECORD} FROM memory_records WHERE user_id = %s ORDER BY id DESC LIMIT %s",
            (user_id, limit)).fetchall())
        return [_record(row) for row in rows]

    # --- vectors -------------------------------------------------------------

    def save_vectors(self, user_id: str, model: str, vectors: Mapping[int, Sequence[float]]) -> int:
        if not vectors:
            self._check_open()
            return 0
        ids = list(vectors)
        matrix = unit_vectors([vectors[i] for i in ids])
        _check_text("the vectors", model=model)
        if not _storable(user_id):
            self._check_open()
            return 0
        dims = int(matrix.shape[1])
        blobs = {int(rid): to_blob(matrix[n]) for n, rid in enumerate(ids)}

        def write(conn: Conn) -> int:
            # ids of this user's vectors get assigned, and committed, one writer at a time
            conn.execute(_VECTOR_LOCK, (user_id,))
            # the records stay until this commits (a forget in progress is waited for, and skipped)
            present = conn.execute("SELECT id, run_id FROM memory_records WHERE id = ANY(%s) AND user_id = %s "
                                   "ORDER BY id FOR KEY SHARE", (list(blobs), user_id)).fetchall()
            stored = 0
            for rid, run_id in present:
                stored += conn.execute(
                    "INSERT INTO memory_vectors (record_id, user_id, run_id, model, dims, vector) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (record_id, model) DO NOTHING",
                    (rid, user_id, run_id, model, dims, blobs[int(rid)])).rowcount
            return stored

        return self._run("save the vectors", write)

    def unembedded(self, user_id: str, model: str, *, limit: int) -> list[Record]:
        if limit <= 0 or not _storable(user_id):
            self._check_open()
            return []
        if not _storable(model):  # no vector of such a model can be stored: every record lacks one
            return self.records(user_id, limit=limit)

        def find(conn: Conn) -> list[Any]:
            row = conn.execute("SELECT (SELECT count(*) FROM memory_records WHERE user_id = %s), "
                               "(SELECT count(*) FROM memory_vectors WHERE user_id = %s AND model = %s)",
                               (user_id, user_id, model)).fetchone()
            if row is not None and int(row[1]) >= int(row[0]):  # every vector is of a record of the user
                return []
            return conn.execute(
                "SELECT r.id, r.user_id, r.session_id, r.run_id, r.text, r.ts FROM memory_records AS r "
                "WHERE r.user_id = %s AND NOT EXISTS (SELECT 1 FROM memory_vectors AS v "
                "WHERE v.record_id = r.id AND v.model = %s) ORDER BY r.id DESC LIMIT %s",
                (user_id, model, limit)).fetchall()

        return [_record(row) for row in self._run("find records without vectors", find)]

    def nearest(
        self, user_id: str, model: str, vector: Sequence[float], *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        query = unit_vectors([vector])[0]
        if limit <= 0 or not _storable(user_id, model):
            self._check_open()
            return []
        dims = int(query.shape[0])
        excluded = set(exclude_runs)

        def find(conn: Conn) -> list[Hit]:
            entry = self._matrix(conn, user_id, model, dims)
            if not entry.record_ids:
                return []
            keep = None
            if excluded:
                from agentkeel.memory.vectors import numpy_module

                keep = numpy_module().fromiter((r not in excluded for r in entry.run_ids), dtype=bool,
                                               count=len(entry.run_ids))
            ranked = cosine_top_k(entry.matrix, query, limit, keep)
            if not ranked:
                return []
            ids = [entry.record_ids[i] for i, _ in ranked]
            rows = conn.execute(f"SELECT {_RECORD} FROM memory_records WHERE user_id = %s AND id = ANY(%s)",
                                (user_id, ids)).fetchall()
            by_id = {int(row[0]): _record(row) for row in rows}
            return [Hit(by_id[rid], score) for rid, (_, score) in zip(ids, ranked, strict=True) if rid in by_id]

        return self._run("find the nearest records", find)

    def _matrix(self, conn: Conn, user_id: str, model: str, dims: int) -> CachedMatrix:
        """The user's vectors of ``model`` and ``dims``, from the cache when it is current."""
        from agentkeel.memory.vectors import numpy_module

        np = numpy_module()
        stamp = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM memory_vectors WHERE user_id = %s AND model = %s "
            "AND dims = %s", (user_id, model, dims)).fetchone()
        count, max_id = (int(stamp[0]), int(stamp[1])) if stamp else (0, 0)
        key = (user_id, model, dims)
        entry = self._vectors.get(key)
        if entry is not None and (entry.count, entry.max_id) == (count, max_id):
            return entry
        select = ("SELECT id, record_id, run_id, vector FROM memory_vectors "
                  "WHERE user_id = %s AND model = %s AND dims = %s AND id > %s ORDER BY id")
        if entry is not None and max_id > entry.max_id:
            rows = conn.execute(select, (user_id, model, dims, entry.max_id)).fetchall()
            if entry.count + len(rows) == count:  # only additions since: append them
                entry = CachedMatrix(entry.record_ids + [int(r[1]) for r in rows],
                                     entry.run_ids + [r[2] for r in rows],
                                     np.concatenate([entry.matrix, from_blobs((bytes(r[3]) for r in rows), dims)]),
                                     count, max_id)
                self._vectors.put(key, entry)
                return entry
        rows = conn.execute(select, (user_id, model, dims, 0)).fetchall()
        entry = CachedMatrix([int(r[1]) for r in rows], [r[2] for r in rows],
                             from_blobs((bytes(r[3]) for r in rows), dims), len(rows),
                             int(rows[-1][0]) if rows else 0)
        self._vectors.put(key, entry)
        return entry

    # --- summaries -----------------------------------------------------------

    def summary(self, user_id: str, session_id: str) -> Summary | None:
        if not _storable(user_id, session_id):
            self._check_open()
            return None
        row = self._run("read the summary", lambda conn: conn.execute(
            "SELECT user_id, session_id, text, upto_turn_id, run_id, source, ts FROM memory_summaries "
            "WHERE user_id = %s AND session_id = %s", (user_id, session_id)).fetchone())
        if row is None:
            return None
        user, session, text, upto, run_id, source, ts = row
        return Summary(user, session, text, int(upto), run_id, source, float(ts))

    def save_summary(self, summary: Summary) -> bool:
        s = summary
        _check_text("the summary", user_id=s.user_id, session_id=s.session_id, text=s.text, run_id=s.run_id,
                    source=s.source)
        ts = s.ts or self._clock()
        changed = self._run("save the summary", lambda conn: conn.execute(
            "INSERT INTO memory_summaries (user_id, session_id, text, upto_turn_id, run_id, source, ts) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (user_id, session_id) DO UPDATE SET "
            "text = excluded.text, upto_turn_id = excluded.upto_turn_id, run_id = excluded.run_id, "
            "source = excluded.source, ts = excluded.ts "
            "WHERE excluded.upto_turn_id > memory_summaries.upto_turn_id",
            (s.user_id, s.session_id, s.text, s.upto_turn_id, s.run_id, s.source, ts)).rowcount)
        return bool(changed)

    # --- profile -------------------------------------------------------------

    def set_fact(self, user_id: str, key: str, value: str, *, run_id: str) -> ProfileFact | None:
        check_fact(key, value)
        _check_text("the profile fact", user_id=user_id, key=key, value=value, run_id=run_id)
        now = self._clock()

        def write(conn: Conn) -> ProfileFact | None:
            while True:
                row = conn.execute("SELECT user_id, key, value, run_id, ts FROM memory_profile "
                                   "WHERE user_id = %s AND key = %s FOR UPDATE", (user_id, key)).fetchone()
                if row is not None:
                    conn.execute("UPDATE memory_profile SET value = %s, run_id = %s, ts = %s "
                                 "WHERE user_id = %s AND key = %s", (value, run_id, now, user_id, key))
                    return _fact(row)
                inserted = conn.execute(
                    "INSERT INTO memory_profile (user_id, key, value, run_id, ts) VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (user_id, key) DO NOTHING", (user_id, key, value, run_id, now)).rowcount
                if inserted:
                    return None
                # another writer inserted the fact meanwhile: read (and lock) it, then replace it

        return self._run("set a profile fact", write)

    def delete_fact(self, user_id: str, key: str) -> ProfileFact | None:
        if not _storable(user_id, key):
            self._check_open()
            return None
        row = self._run("delete a profile fact", lambda conn: conn.execute(
            "DELETE FROM memory_profile WHERE user_id = %s AND key = %s RETURNING user_id, key, value, run_id, ts",
            (user_id, key)).fetchone())
        return _fact(row) if row is not None else None

    def profile(self, user_id: str) -> list[ProfileFact]:
        if not _storable(user_id):
            self._check_open()
            return []
        rows = self._run("read the profile", lambda conn: conn.execute(
            'SELECT user_id, key, value, run_id, ts FROM memory_profile WHERE user_id = %s ORDER BY key COLLATE "C"',
            (user_id,)).fetchall())
        return [_fact(row) for row in rows]

    # --- inventory -----------------------------------------------------------

    def sessions(self, user_id: str) -> list[SessionInfo]:
        if not _storable(user_id):
            self._check_open()
            return []
        rows = self._run("list the sessions", lambda conn: conn.execute(
            "SELECT t.session_id, count(*), min(t.ts), max(t.ts), coalesce(max(s.upto_turn_id), 0) "
            "FROM memory_turns AS t LEFT JOIN memory_summaries AS s "
            "ON s.user_id = t.user_id AND s.session_id = t.session_id "
            'WHERE t.user_id = %s GROUP BY t.session_id ORDER BY max(t.ts) DESC, t.session_id COLLATE "C"',
            (user_id,)).fetchall())
        return [SessionInfo(r[0], int(r[1]), float(r[2]), float(r[3]), int(r[4])) for r in rows]

    def users(self) -> list[str]:
        rows = self._run("list the users", lambda conn: conn.execute(
            "SELECT user_id FROM (SELECT user_id FROM memory_turns UNION SELECT user_id FROM memory_records "
            "UNION SELECT user_id FROM memory_profile UNION SELECT user_id FROM memory_summaries) AS u "
            'ORDER BY user_id COLLATE "C"').fetchall())
        return [row[0] for row in rows]

    # --- forgetting ----------------------------------------------------------

    def forget(self, user_id: str, *, session_id: str | None = None, before: float | None = None) -> ForgetReport:
        if not _storable(user_id) or (session_id is not None and not _storable(session_id)):
            self._check_open()
            return ForgetReport()
        where, args = "user_id = %s", [user_id]
        if session_id is not None:
            where, args = where + " AND session_id = %s", [*args, session_id]
        return self._delete(where, args, before, profile=session_id is None)

    def expire(self, before: float) -> ForgetReport:
        return self._delete("TRUE", [], before, profile=True)

    def _delete(self, where: str, args: list[Any], before: float | None, *, profile: bool) -> ForgetReport:
        timed, targs = (f"{where} AND ts < %s", [*args, before]) if before is not None else (where, args)

        def delete(conn: Conn) -> ForgetReport:
            # one statement: the records and their vectors go together (the foreign key takes any
            # vector written meanwhile), and the full-text entry is a column of the record's row
            row = conn.execute(
                f"WITH gone AS (DELETE FROM memory_records WHERE {timed} RETURNING id), "
                "vectors AS (DELETE FROM memory_vectors WHERE record_id IN (SELECT id FROM gone) RETURNING 1) "
                "SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM vectors)", targs).fetchone()
            records, embeddings = (int(row[0]), int(row[1])) if row else (0, 0)
            turns = conn.execute(f"DELETE FROM memory_turns WHERE {timed}", targs).rowcount
            summaries = conn.execute(f"DELETE FROM memory_summaries WHERE {timed}", targs).rowcount
            # profile facts belong to the user, not to a session: only a forget without one takes them
            facts = conn.execute(f"DELETE FROM memory_profile WHERE {timed}", targs).rowcount if profile else 0
            return ForgetReport(turns, records, summaries, facts, embeddings)

        return self._run("forget", delete)

    def vacuum(self) -> None:
        self._run("vacuum", lambda conn: None)  # open (and migrated) before VACUUM names the tables
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=int(pg.CONNECT_TIMEOUT_S)) as conn:
                conn.execute(f"VACUUM {', '.join(_TABLES)}")
        except psycopg.Error as exc:
            raise StoreError(f"the memory store at {self.label}: vacuum failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._vectors.clear()

    def __repr__(self) -> str:
        return f"PostgresMemoryStore({self.label!r})"
