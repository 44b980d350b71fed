"""The memory store in ``<home>/agentkeel.db``: turns, summaries, profile, and records
indexed by SQLite FTS5 (BM25).

A record's full-text row (``memory_records_fts``, rowid = the record's id) is
written and deleted in the same transaction as the record, so the index never
holds a forgotten record. Each full-text row carries its user as one indexed
token (``owner``: a hash of the user id), and a search matches that token AND
the query's terms, so it reads one user's postings only; the join on
``memory_records.user_id`` checks the user again. The query reaches FTS5 only as
``query_terms`` quoted as phrases: no character of it is FTS5 syntax.

A record's vectors (``memory_vectors``, one per embedding model) are deleted in
the same transaction as the record. ``nearest`` ranks a user's vectors of one
model with numpy, on a matrix kept in the process between searches
(``agentkeel.memory.vectors.VectorCache``) and checked against the file on every
search, so a write by another process is seen at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agentkeel.memory.store import (
    ForgetReport,
    Hit,
    ProfileFact,
    Record,
    SessionInfo,
    Summary,
    Turn,
    check_fact,
    query_terms,
)
from agentkeel.memory.vectors import CachedMatrix, VectorCache, cosine_top_k, from_blobs, to_blob, unit_vectors
from agentkeel.stores import DEFAULT_BUSY_TIMEOUT_S, ProcessConnection, atomic

__all__ = ["SQLiteMemoryStore", "owner_token"]


def owner_token(user_id: str) -> str:
    """The one FTS5 token standing for ``user_id`` in the index (letters and digits only)."""
    return "u" + hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


COMMON_SHARE = 0.05
COMMON_MIN = 1000

_INSERT_TURN = ("INSERT INTO memory_turns (user_id, session_id, run_id, role, content, status, ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")
_SEARCH = """
    SELECT r.id, r.user_id, r.session_id, r.run_id, r.text, r.ts, bm25(memory_records_fts, 1.0, 0.0) AS rank
    FROM memory_records_fts JOIN memory_records AS r ON r.id = memory_records_fts.rowid
    WHERE memory_records_fts MATCH ? AND r.user_id = ?
      AND r.run_id NOT IN (SELECT value FROM json_each(?))
    ORDER BY rank LIMIT ?
"""


class SQLiteMemoryStore:
    """``MemoryStore`` on SQLite; safe across threads and processes."""

    def __init__(self, home: str | os.PathLike[str], *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self._db = ProcessConnection(home, "memory store", busy_timeout_s=busy_timeout_s)
        self._vectors = VectorCache()

    # --- turns and records ---------------------------------------------------

    def save_exchange(
        self, user_id: str, session_id: str, run_id: str, message: str, answer: str, *, status: str = "",
        record: str | None = None, ts: float = 0.0,
    ) -> None:
        now = ts or time.time()

        def write(conn: sqlite3.Connection) -> None:
            conn.executemany(_INSERT_TURN, [(user_id, session_id, run_id, "user", message, status, now),
                                            (user_id, session_id, run_id, "assistant", answer, status, now)])
            if record is not None:
                rid = conn.execute(
                    "INSERT INTO memory_records (user_id, session_id, run_id, text, ts) VALUES (?, ?, ?, ?, ?)",
                    (user_id, session_id, run_id, record, now)).lastrowid
                conn.execute("INSERT INTO memory_records_fts (rowid, text, owner) VALUES (?, ?, ?)",
                             (rid, record, owner_token(user_id)))

        self._db.run("save the exchange", lambda conn: atomic(conn, write))

    def recent_turns(self, user_id: str, session_id: str, *, limit: int, after_id: int = 0) -> list[Turn]:
        rows = self._db.run("read the recent turns", lambda conn: conn.execute(
            "SELECT id, user_id, session_id, run_id, role, content, ts, coalesce(status, '') FROM memory_turns "
            "WHERE user_id = ? AND session_id = ? AND id > ? ORDER BY id DESC LIMIT ?",
            (user_id, session_id, after_id, limit)).fetchall())
        return [Turn(*row) for row in rows]

    def search(self, user_id: str, query: str, *, limit: int, exclude_runs: Iterable[str] = ()) -> list[Hit]:
        terms = query_terms(query)
        if not terms or limit <= 0:
            return []
        # the excluded runs go in as one JSON array: left out in SQL, before LIMIT, whatever their number
        excluded = json.dumps(sorted(set(exclude_runs)))

        def find(conn: sqlite3.Connection) -> list[Any]:
            chosen = self._selective(conn, terms)
            expression = f'owner : "{owner_token(user_id)}" AND (' + " OR ".join(f'"{t}"' for t in chosen) + ")"
            return conn.execute(_SEARCH, (expression, user_id, excluded, limit)).fetchall()

        return [Hit(Record(*row[:6]), -float(row[6])) for row in self._db.run("search the records", find)]

    @staticmethod
    def _selective(conn: sqlite3.Connection, terms: list[str]) -> list[str]:
        """The terms worth searching for: ranking every record that holds a word most records
        hold costs time and tells little (its idf is near zero), so terms held by more than
        ``COMMON_SHARE`` of the records (and at least ``COMMON_MIN``) are left out, unless
        every term is that common (then the rarest one is kept)."""
        # max(id) is read from the index at once; it counts deleted records too, which only
        # makes the cap a little more generous
        total = conn.execute("SELECT coalesce(max(id), 0) FROM memory_records").fetchone()[0]
        cap = max(COMMON_MIN, int(total * COMMON_SHARE))
        if total <= cap:
            return terms
        marks = ",".join("?" * len(terms))
        docs = dict(conn.execute(f"SELECT term, doc FROM memory_records_vocab WHERE term IN ({marks})",
                                 terms).fetchall())
        chosen = [t for t in terms if docs.get(t, 0) <= cap]
        return chosen or [min(terms, key=lambda t: docs.get(t, 0))]

    def records(self, user_id: str, *, limit: int = 100) -> list[Record]:
        rows = self._db.run("list the records", lambda conn: conn.execute(
            "SELECT id, user_id, session_id, run_id, text, ts FROM memory_records WHERE user_id = ? "
            "ORDER BY id DESC LIMIT ?", (user_id, limit)).fetchall())
        return [Record(*row) for row in rows]

    # --- vectors -------------------------------------------------------------

    def save_vectors(self, user_id: str, model: str, vectors: Mapping[int, Sequence[float]]) -> int:
        if not vectors:
            return 0
        ids = list(vectors)
        matrix = unit_vectors([vectors[i] for i in ids])
        dims = int(matrix.shape[1])
        rows = [(model, dims, to_blob(matrix[n]), int(rid), user_id) for n, rid in enumerate(ids)]

        def write(conn: sqlite3.Connection) -> int:
            stored = 0
            for row in rows:
                stored += conn.execute(
                    "INSERT INTO memory_vectors (record_id, user_id, run_id, model, dims, vector) "
                    "SELECT id, user_id, run_id, ?, ?, ? FROM memory_records WHERE id = ? AND user_id = ? "
                    "ON CONFLICT (record_id, model) DO NOTHING", row).rowcount
            return stored

        return self._db.run("save the vectors", lambda conn: atomic(conn, write))

    def unembedded(self, user_id: str, model: str, *, limit: int) -> list[Record]:
        if limit <= 0:
            return []

        def find(conn: sqlite3.Connection) -> list[Any]:
            records = conn.execute("SELECT count(*) FROM memory_records WHERE user_id = ?", (user_id,)).fetchone()[0]
            embedded = conn.execute("SELECT count(*) FROM memory_vectors WHERE user_id = ? AND model = ?",
                                    (user_id, model)).fetchone()[0]
            if embedded >= records:  # every vector belongs to a record of the user: none is missing
                return []
            return conn.execute(
                "SELECT r.id, r.user_id, r.session_id, r.run_id, r.text, r.ts FROM memory_records AS r "
                "WHERE r.user_id = ? AND NOT EXISTS (SELECT 1 FROM memory_vectors AS v "
                "WHERE v.record_id = r.id AND v.model = ?) ORDER BY r.id DESC LIMIT ?",
                (user_id, model, limit)).fetchall()

        return [Record(*row) for row in self._db.run("find records without vectors", find)]

    def nearest(
        self, user_id: str, model: str, vector: Sequence[float], *, limit: int, exclude_runs: Iterable[str] = ()
    ) -> list[Hit]:
        query = unit_vectors([vector])[0]
        if limit <= 0:
            return []
        dims = int(query.shape[0])
        entry = self._db.run("read the vectors", lambda conn: self._matrix(conn, user_id, model, dims))
        if not entry.record_ids:
            return []
        excluded = set(exclude_runs)
        keep = None
        if excluded:
            from agentkeel.memory.vectors import numpy_module

            keep = numpy_module().fromiter((r not in excluded for r in entry.run_ids), dtype=bool,
                                           count=len(entry.run_ids))
        ranked = cosine_top_k(entry.matrix, query, limit, keep)
        if not ranked:
            return []
        ids = [entry.record_ids[i] for i, _ in ranked]
        marks = ",".join("?" * len(ids))
        rows = self._db.run("read the nearest records", lambda conn: conn.execute(
            f"SELECT id, user_id, session_id, run_id, text, ts FROM memory_records "
            f"WHERE user_id = ? AND id IN ({marks})", (user_id, *ids)).fetchall())
        by_id = {row[0]: Record(*row) for row in rows}
        return [Hit(by_id[rid], score) for rid, (_, score) in zip(ids, ranked, strict=True) if rid in by_id]

    def _matrix(self, conn: sqlite3.Connection, user_id: str, model: str, dims: int) -> CachedMatrix:
        """The user's vectors of ``model`` and ``dims``, from the cache when it is current."""
        from agentkeel.memory.vectors import numpy_module

        np = numpy_module()
        count, max_id = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM memory_vectors WHERE user_id = ? AND model = ? AND dims = ?",
            (user_id, model, dims)).fetchone()
        key = (user_id, model, dims)
        entry = self._vectors.get(key)
        if entry is not None and (entry.count, entry.max_id) == (count, max_id):
            return entry
        select = ("SELECT id, record_id, run_id, vector FROM memory_vectors "
                  "WHERE user_id = ? AND model = ? AND dims = ? AND id > ? ORDER BY id")
        if entry is not None and max_id > entry.max_id:
            rows = conn.execute(select, (user_id, model, dims, entry.max_id)).fetchall()
            if entry.count + len(rows) == count:  # only additions since: append them
                entry = CachedMatrix(entry.record_ids + [r[1] for r in rows], entry.run_ids + [r[2] for r in rows],
                                     np.concatenate([entry.matrix, from_blobs((r[3] for r in rows), dims)]),
                                     count, max_id)
                self._vectors.put(key, entry)
                return entry
        rows = conn.execute(select, (user_id, model, dims, 0)).fetchall()
        entry = CachedMatrix([r[1] for r in rows], [r[2] for r in rows],
                             from_blobs((r[3] for r in rows), dims), len(rows), rows[-1][0] if rows else 0)
        self._vectors.put(key, entry)
        return entry

    # --- summaries -----------------------------------------------------------

    def summary(self, user_id: str, session_id: str) -> Summary | None:
        row = self._db.run("read the summary", lambda conn: conn.execute(
            "SELECT user_id, session_id, text, upto_turn_id, run_id, source, ts FROM memory_summaries "
            "WHERE user_id = ? AND session_id = ?", (user_id, session_id)).fetchone())
        return Summary(*row) if row is not None else None

    def save_summary(self, summary: Summary) -> bool:
        s = summary
        changed = self._db.run("save the summary", lambda conn: conn.execute(
            "INSERT INTO memory_summaries (user_id, session_id, text, upto_turn_id, run_id, source, ts) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, session_id) DO UPDATE SET "
            "text = excluded.text, upto_turn_id = excluded.upto_turn_id, run_id = excluded.run_id, "
            "source = excluded.source, ts = excluded.ts "
            "WHERE excluded.upto_turn_id > memory_summaries.upto_turn_id",
            (s.user_id, s.session_id, s.text, s.upto_turn_id, s.run_id, s.source, s.ts or time.time())).rowcount)
        return bool(changed)

    # --- profile -------------------------------------------------------------

    def set_fact(self, user_id: str, key: str, value: str, *, run_id: str) -> ProfileFact | None:
        check_fact(key, value)

        def write(conn: sqlite3.Connection) -> ProfileFact | None:
            row = conn.execute("SELECT user_id, key, value, run_id, ts FROM memory_profile "
                               "WHERE user_id = ? AND key = ?", (user_id, key)).fetchone()
            conn.execute("INSERT INTO memory_profile (user_id, key, value, run_id, ts) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT (user_id, key) DO UPDATE SET value = excluded.value, "
                         "run_id = excluded.run_id, ts = excluded.ts", (user_id, key, value, run_id, time.time()))
            return ProfileFact(*row) if row is not None else None

        return self._db.run("set a profile fact", lambda conn: atomic(conn, write))

    def delete_fact(self, user_id: str, key: str) -> ProfileFact | None:
        def delete(conn: sqlite3.Connection) -> ProfileFact | None:
            row = conn.execute("DELETE FROM memory_profile WHERE user_id = ? AND key = ? "
                               "RETURNING user_id, key, value, run_id, ts", (user_id, key)).fetchone()
            return ProfileFact(*row) if row is not None else None

        return self._db.run("delete a profile fact", lambda conn: atomic(conn, delete))

    def profile(self, user_id: str) -> list[ProfileFact]:
        rows = self._db.run("read the profile", lambda conn: conn.execute(
            "SELECT user_id, key, value, run_id, ts FROM memory_profile WHERE user_id = ? ORDER BY key",
            (user_id,)).fetchall())
        return [ProfileFact(*row) for row in rows]

    # --- inventory -----------------------------------------------------------

    def sessions(self, user_id: str) -> list[SessionInfo]:
        rows = self._db.run("list the sessions", lambda conn: conn.execute(
            "SELECT t.session_id, count(*), min(t.ts), max(t.ts), coalesce(max(s.upto_turn_id), 0) "
            "FROM memory_turns AS t LEFT JOIN memory_summaries AS s "
            "ON s.user_id = t.user_id AND s.session_id = t.session_id "
            "WHERE t.user_id = ? GROUP BY t.session_id ORDER BY max(t.ts) DESC, t.session_id",
            (user_id,)).fetchall())
        return [SessionInfo(*row) for row in rows]

    def users(self) -> list[str]:
        rows = self._db.run("list the users", lambda conn: conn.execute(
            "SELECT user_id FROM memory_turns UNION SELECT user_id FROM memory_records "
            "UNION SELECT user_id FROM memory_profile UNION SELECT user_id FROM memory_summaries "
            "ORDER BY 1").fetchall())
        return [row[0] for row in rows]

    # --- forgetting ----------------------------------------------------------

    def forget(self, user_id: str, *, session_id: str | None = None, before: float | None = None) -> ForgetReport:
        where, args = "user_id = ?", [user_id]
        if session_id is not None:
            where, args = where + " AND session_id = ?", [*args, session_id]
        return self._delete(where, args, before, profile=session_id is None)

    def expire(self, before: float) -> ForgetReport:
        return self._delete("1 = 1", [], before, profile=True)

    def _delete(self, where: str, args: list[Any], before: float | None, *, profile: bool) -> ForgetReport:
        timed, targs = (f"{where} AND ts < ?", [*args, before]) if before is not None else (where, args)

        def delete(conn: sqlite3.Connection) -> ForgetReport:
            embeddings = conn.execute(f"DELETE FROM memory_vectors WHERE record_id IN "
                                      f"(SELECT id FROM memory_records WHERE {timed})", targs).rowcount
            conn.execute(f"DELETE FROM memory_records_fts WHERE rowid IN "
                         f"(SELECT id FROM memory_records WHERE {timed})", targs)
            records = conn.execute(f"DELETE FROM memory_records WHERE {timed}", targs).rowcount
            turns = conn.execute(f"DELETE FROM memory_turns WHERE {timed}", targs).rowcount
            summaries = conn.execute(f"DELETE FROM memory_summaries WHERE {timed}", targs).rowcount
            # profile facts belong to the user, not to a session: only a forget without one takes them
            facts = (conn.execute(f"DELETE FROM memory_profile WHERE {timed}", targs).rowcount
                     if profile else 0)
            return ForgetReport(turns, records, summaries, facts, embeddings)

        return self._db.run("forget", lambda conn: atomic(conn, delete))

    def vacuum(self) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO memory_records_fts (memory_records_fts) VALUES ('optimize')")
            conn.execute("VACUUM")

        self._db.run("vacuum", run)

    def close(self) -> None:
        self._vectors.clear()
        self._db.close()

