"""The append-only, hash-chained audit log (``<home>/audit.jsonl``) and its anchor.

Format (version 2). Every permission decision and every tool call becomes one
line: the fields of an ``AuditRecord`` plus ``seq`` (1, 2, 3, ...), ``prev``
(the ``hash`` of the line before, ``GENESIS`` for the first) and ``v`` (2),
written as canonical JSON (sorted keys, no spaces, UTF-8, no escapes but the
required ones), then ``hash`` appended in one fixed way::

    BODY = {"action":...,"arg_keys":[...],...,"ts":1712345678.123,"v":2}
    line = BODY[:-1] + ',"hash":"' + sha256(BODY).hexdigest() + '"}' + "\\n"

so the hash covers the exact bytes of the line: ``BODY`` is the line with its
last 76 bytes (``,"hash":"<64 hex>"}`` and the newline) replaced by ``}``.
``verify`` recomputes it from those bytes, never from a parsed object, so any
byte edit (whitespace, key order, an escape, a duplicate key) breaks the line.
It also refuses lines that are not valid UTF-8, hold a duplicate key, a NaN or
infinite number or a lone surrogate, or are not byte-identical to the canonical
encoding of what they parse to: every line means one thing to every reader.

Format 1 (lines without ``v``, written before the version field existed) used
the same canonical body and the same fixed ``hash`` suffix, so ``verify`` checks
such lines byte for byte the same way and counts them in
``VerifyResult.legacy_records``. A format-1 line after a format-2 line is refused
(writers never go back). Appending to a format-1 log continues its chain.

Anchor. Editing a line, or cutting, inserting or reordering lines, breaks the
chain at that line. Emptying, truncating, deleting or replacing the whole file
with a freshly chained forgery does not; so writers also record the head (the
last hash), the record count and the byte offset where that record ends in the
``audit_head`` table of ``<home>/agentkeel.db``, the store the journal uses (one
UPSERT, never moving the anchor backwards). A writer anchors its newest record
at the end of every request (``flush``, called by the host), on ``close``, and
while it keeps appending at most ``ANCHOR_INTERVAL_S`` after an append (every
append with ``fsync=True``): one SQLite commit per request instead of one per
record, which is what keeps the anchor off the per-step path. Records past the
anchor are reported by ``verify`` as not anchored yet (a note, not a failure):
cutting those few in-flight records is the one thing the anchor cannot detect. ``verify`` compares the file
with that row: fewer records (truncated, emptied), another head (replaced) or no
file (deleted) fail. A writer that opens a log which does not continue its
anchored chain records that in the row's ``broken`` column (kept until someone
deletes the row), so deleting the log and letting the next run start a new chain
is still reported. A writer finding more records than the anchor counts checks
(one short read at the anchored offset) that the anchored record is still there.
A power cut can also leave the two disagreeing (neither is fsynced unless
``fsync=True``), which is reported the same way as tampering.
The anchor proves nothing against someone who can write both the log and the
database.

Anchor stores. The anchor is written through an ``AnchorStore`` (``load``,
``mark_broken``, ``save``, ``read``): ``SQLiteAnchor`` (the ``audit_head`` row
above) always, unless ``anchor=False``, plus an optional ``extra_anchor``, written
at the same moments. ``agentkeel.permissions.audit_pg.PostgresAnchor`` is the one
used with ``[store] url``: the anchor of each replica's chain lives outside the
replica, so replacing the log together with the local database is still detected.
A writer that finds another writer appended since its own last record first checks
(one short read) that its own last record is still where it wrote it; only when it
is not does it read the anchors held elsewhere (``local = False``), so a shared
file never costs a database round trip per record.

Writers: the file is opened with ``O_APPEND`` and each record is one ``write``
under an exclusive ``flock``, so several processes appending to one file keep a
single chain. A writer remembers the file size after its own last write and
re-reads the last line (seeking from the end) only when another writer has
appended since; the usual cost per record is a lock, an ``fstat``, a write and
the anchor UPSERT (WAL, ``synchronous=NORMAL``; ``FULL`` with ``fsync=True``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

import attrs

import agentkeel.jsonvalue as jsonvalue
from agentkeel.errors import AuditLogError
from agentkeel.stores import db_path, open_db
from agentkeel.types import AuditRecord

if TYPE_CHECKING:
    from agentkeel.config import Config

AUDIT_FILENAME = "audit.jsonl"
GENESIS = "0" * 64
FORMAT = 2
LEGACY_FORMAT = 1
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(AuditRecord))
CHAIN_FIELDS = ("seq", "prev", "hash")
LINE_FIELDS = frozenset((*RECORD_FIELDS, *CHAIN_FIELDS, "v"))
LEGACY_LINE_FIELDS = frozenset((*RECORD_FIELDS, *CHAIN_FIELDS))
_TAIL_BLOCK = 4096
# The fixed end of every line: the hash of the bytes before it, then "}" and a newline.
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}\n\Z')

ANCHOR_TABLE = "audit_head"
_CREATE_ANCHOR = f"""
CREATE TABLE IF NOT EXISTS {ANCHOR_TABLE} (
    log_path   TEXT PRIMARY KEY,
    head       TEXT NOT NULL,
    count      INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    broken     TEXT,
    size       INTEGER
)
"""
_UPSERT_ANCHOR = (
    f"INSERT INTO {ANCHOR_TABLE} (log_path, head, count, updated_at, size) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (log_path) DO UPDATE SET "
    "head = excluded.head, count = excluded.count, updated_at = excluded.updated_at, size = excluded.size "
    "WHERE excluded.count > audit_head.count"
)
ANCHOR_INTERVAL_S = 0.25
"""The longest a writer leaves its newest records unanchored while it keeps appending."""
_SELECT_ANCHOR = f"SELECT count, head, updated_at, broken FROM {ANCHOR_TABLE} WHERE log_path = ?"
# One statement, so the count, head and offset are of the same anchoring (another writer may anchor between two).
_SELECT_ANCHOR_WITH_SIZE = f"SELECT count, head, broken, size FROM {ANCHOR_TABLE} WHERE log_path = ?"


def default_path(config: Config) -> Path:
    """Where the audit log of ``config`` lives: ``<config.home>/audit.jsonl``."""
    return Path(config.home) / AUDIT_FILENAME


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(obj: dict[str, Any]) -> bytes:
    """The bytes that are hashed: sorted keys, no whitespace, UTF-8."""
    return _CANONICAL.encode(obj).encode()


_str = json.encoder.encode_basestring  # the C encoder canonical() uses for strings


def record_text(
    *, ts: float, run_id: str, principal: str, action: str, tool: str, decision: str, reason: str,
    arg_keys: tuple[str, ...], seq: int, prev: str,
) -> bytes:
    """``canonical()`` of one format-2 record without ``hash``, written out directly:
    keys in sorted order, the same string and float encoders. About five times
    cheaper than the general encoder, and it runs for every permission decision
    and tool call. A lone surrogate in a field (which UTF-8 cannot hold) is
    written as U+FFFD."""
    keys = ",".join(map(_str, arg_keys))
    text = (
        f'{{"action":{_str(action)},"arg_keys":[{keys}],"decision":{_str(decision)},'
        f'"prev":{_str(prev)},"principal":{_str(principal)},"reason":{_str(reason)},'
        f'"run_id":{_str(run_id)},"seq":{seq},"tool":{_str(tool)},"ts":{float.__repr__(ts)},'
        f'"v":{FORMAT}}}'
    )
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode()


def line_hash(body: dict[str, Any]) -> str:
    """The hash of one line's fields, ``hash`` excluded (for a line in canonical form,
    the hash of its bytes)."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


def anchor_key(path: str | os.PathLike[str], home: str | os.PathLike[str]) -> str:
    """The ``log_path`` of the anchor row of the log at ``path`` in ``<home>/agentkeel.db``:
    the path relative to ``home`` when the log lies under it (``audit.jsonl``; a
    home moved elsewhere keeps its anchors), else the absolute path."""
    log = Path(path).expanduser().resolve()
    base = Path(home).expanduser().resolve()
    try:
        return log.relative_to(base).as_posix()
    except ValueError:
        return str(log)


StoredAnchor = tuple[int, str, str | None, Any]
"""(count, head, broken, end offset or None) of one anchor row, as a writer checks it."""


class AnchorStore(Protocol):
    """Where the anchor of one log is kept: one object per log, the key inside.

    Every method raises ``AuditLogError`` (naming ``where``) when the store fails.
    ``open`` is idempotent and is called again in a forked child, which must not
    use its parent's connection."""

    where: str
    """The store, for messages (a database file, a server: never a password)."""
    local: bool
    """Whether reading it is as cheap as a local file (see ``AuditLog``)."""

    def open(self) -> None: ...

    def load(self) -> StoredAnchor | None: ...

    def mark_broken(self, detail: str) -> None:
        """Set the row's ``broken`` to ``detail`` unless it is set already."""

    def save(self, head: str, count: int, ts: float, end: int) -> None:
        """UPSERT the anchor, never moving it backwards (to a smaller count)."""

    def read(self) -> Anchor | str:
        """The anchor for ``verify``, or why there is none (never creates anything)."""

    def close(self) -> None: ...


class SQLiteAnchor:
    """The ``audit_head`` row of the log at ``path`` in ``<home>/agentkeel.db``."""

    local = True

    def __init__(self, path: str | os.PathLike[str], home: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.home = Path(home)
        self.fsync = fsync
        self.key = anchor_key(self.path, self.home)
        self.where = str(db_path(self.home))
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._inherited: list[sqlite3.Connection] = []

    def open(self) -> None:
        if self._db is not None:
            if self._pid == os.getpid():
                return
            # A forked child keeps its parent's connection alive but never uses (nor closes) it.
            self._inherited.append(self._db)
            self._db = None
        try:
            conn = open_db(self.home)
        except (sqlite3.Error, OSError) as exc:
            raise AuditLogError(
                f"cannot open {db_path(self.home)}, where the audit log {self.path} records its "
                f"head: {exc}"
            ) from exc
        try:
            conn.execute(_CREATE_ANCHOR)
            if self.fsync:
                conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            conn.close()
            raise AuditLogError(
                f"cannot create the {ANCHOR_TABLE} table in {db_path(self.home)}: {exc}"
            ) from exc
        self._db, self._pid = conn, os.getpid()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            self.open()
        assert self._db is not None
        return self._db

    def load(self) -> StoredAnchor | None:
        try:
            row = self._conn().execute(_SELECT_ANCHOR_WITH_SIZE, (self.key,)).fetchone()
        except sqlite3.Error as exc:
            raise AuditLogError(
                f"cannot read the anchor of {self.path} in {db_path(self.home)}: {exc}"
            ) from exc
        if row is None:
            return None
        count, head, broken, end = row
        return int(count), str(head), broken, end

    def mark_broken(self, detail: str) -> None:
        try:
            self._conn().execute(
                f"UPDATE {ANCHOR_TABLE} SET broken = ? WHERE log_path = ? AND broken IS NULL",
                (detail, self.key),
            )
        except sqlite3.Error as exc:
            raise AuditLogError(
                f"cannot read the anchor of {self.path} in {db_path(self.home)}: {exc}"
            ) from exc

    def save(self, head: str, count: int, ts: float, end: int) -> None:
        try:
            self._conn().execute(_UPSERT_ANCHOR, (self.key, head, count, ts, end))
        except sqlite3.Error as exc:
            raise AuditLogError(
                f"record {count} was appended to {self.path}, but its anchor in "
                f"{db_path(self.home)} could not be updated ({exc}); the next anchoring "
                "updates it, and until then `agentkeel audit verify` reports the record as not anchored"
            ) from exc

    def read(self) -> Anchor | str:
        return read_anchor(self.path, self.home)

    def close(self) -> None:
        if self._db is not None:
            if self._pid == os.getpid():
                self._db.close()
            else:
                self._inherited.append(self._db)
            self._db = None


class AuditLog:
    """Appends hash-chained records to ``path``. Thread-safe and multi-process safe.

    Opening continues the chain found in the file. ``fsync=True`` makes every
    record durable before ``record`` returns (much slower); otherwise a record
    is handed to the kernel with one ``write`` and survives a process crash,
    not a power cut. Raises ``AuditLogError`` when the file ends in a damaged
    line (an interrupted write): appending after it would hide where it broke.

    Each append also updates the anchor row of this log in ``<home>/agentkeel.db``
    (``home`` defaults to the log's directory, which is ``config.home`` for the
    default log); ``anchor=False`` skips it (``verify`` then reports the log as
    not anchored). ``extra_anchor`` is a further ``AnchorStore`` written at the
    same moments (``PostgresAnchor`` with ``[store] url``), also with ``anchor=False``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        home: str | os.PathLike[str] | None = None,
        anchor: bool = True,
        extra_anchor: AnchorStore | None = None,
    ) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.home = Path(home) if home is not None else self.path.parent
        self.anchor = anchor
        self.anchors: tuple[AnchorStore, ...] = (
            *((SQLiteAnchor(self.path, self.home, fsync=fsync),) if anchor else ()),
            *((extra_anchor,) if extra_anchor is not None else ()),
        )
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._size = -1  # file size after our last write; -1 forces a re-read
        self._seq = 0
        self._prev = GENESIS
        self._pending: tuple[str, int, float, int] | None = None  # (head, count, ts, end) not yet anchored
        self._anchor_due = 0.0
        self._open()

    @classmethod
    def for_config(cls, config: Config, *, fsync: bool = False) -> AuditLog:
        return cls(default_path(config), fsync=fsync, home=config.home)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pid = os.getpid()
        try:
            for store in self.anchors:
                store.open()
        except BaseException:
            self._close_anchors()
            raise
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._size = -1
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._sync_tail(os.fstat(self._fd).st_size)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            self._close_anchors()
            raise
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _close_anchors(self) -> None:
        for store in self.anchors:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing after another failure; that one is raised
                pass

    def _sync_tail(self, size: int) -> None:
        """Take ``seq`` and ``prev`` from the last line of a file of ``size`` bytes, and
        check that the file still continues the anchored chain."""
        assert self._fd is not None
        if size == 0:
            seq, head, before = 0, GENESIS, GENESIS
        else:
            last = _read_last_line(self._fd, size)
            if not last.endswith(b"\n"):
                raise AuditLogError(
                    f"{self.path} ends with an incomplete line (an interrupted write); "
                    f"run `agentkeel audit verify {self.path}`, then move the file aside "
                    "or cut the partial line before appending"
                )
            try:
                body = json.loads(last)
                seq, head, before = body["seq"], body["hash"], body["prev"]
                if not isinstance(seq, int) or not isinstance(head, str):
                    raise TypeError("seq must be an integer and hash a string")
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditLogError(
                    f"the last line of {self.path} is not an audit record ({exc}); "
                    f"run `agentkeel audit verify {self.path}` and move the file aside"
                ) from exc
        if self.anchors:
            # Another writer appended since our last record: if that record is still where we
            # wrote it, the file continues what we knew, and the remote anchors need no round trip.
            remote = [store for store in self.anchors if not store.local]
            ours_intact = bool(remote) and 0 < self._size < size and self._anchored_line_intact(
                self._seq, self._prev, self._size
            )
            for store in self.anchors:
                if store.local or not ours_intact:
                    self._check_anchor(store, seq, head, before)
        self._seq, self._prev = seq, head
        self._size = size

    def _anchored_line_intact(self, count: int, anchored: str, end: Any) -> bool:
        """Whether the anchored record is still where the anchor says it ends (O(1): one short read)."""
        assert self._fd is not None
        if end is None:
            return True  # anchored before offsets were recorded: nothing to compare
        if not isinstance(end, int) or end <= 0:
            return False
        try:
            body = json.loads(_read_last_line(self._fd, end))
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("seq") == count and body.get("hash") == anchored

    def _check_anchor(self, store: AnchorStore, seq: int, head: str, before: Any) -> None:
        """Record in the anchor row when the file no longer continues the anchored chain."""
        row = store.load()
        if row is None:
            return
        count, anchored, broken, end = row
        if (seq, head) == (count, anchored):
            return
        if seq > count and self._anchored_line_intact(count, anchored, end):
            return  # the anchor lags the file (writers anchor at most every ANCHOR_INTERVAL_S)
        if broken is None:
            when = time.strftime("%Y-%m-%d %H:%M:%S %z")
            detail = (
                f"on {when} a writer found {seq} record(s) (head {head}) in the log where its "
                f"anchor had {count} (head {anchored}): records were cut, or the file was "
                "emptied, deleted or replaced; later records continue the new chain"
            )
            store.mark_broken(detail)

    def record(
        self,
        *,
        run_id: str,
        principal: str,
        action: str,
        tool: str,
        decision: str,
        reason: str,
        arg_keys: Iterable[str] = (),
    ) -> AuditRecord:
        """Append one record and return it. One ``write`` and one anchor UPSERT per
        record; see the class docs."""
        keys = tuple(arg_keys)
        ts = self.append(run_id=run_id, principal=principal, action=action, tool=tool, decision=decision,
                         reason=reason, arg_keys=keys)
        return AuditRecord(ts=ts, run_id=run_id, principal=principal, action=action, tool=tool, decision=decision,
                           reason=reason, arg_keys=keys)

    def append(
        self,
        *,
        run_id: str,
        principal: str,
        action: str,
        tool: str,
        decision: str,
        reason: str,
        arg_keys: tuple[str, ...] = (),
    ) -> float:
        """``record`` without building the returned record (the per-step path): its timestamp."""
        ts = time.time()
        with self._lock:
            if self._pid != os.getpid():
                self._reopen_after_fork()
            fd = self._fd
            if fd is None:
                raise AuditLogError(
                    f"the audit log {self.path} is closed; open a new AuditLog to append"
                )
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                size = os.fstat(fd).st_size
                if size != self._size:
                    self._sync_tail(size)
                seq = self._seq + 1
                text = record_text(
                    ts=ts, run_id=run_id, principal=principal, action=action, tool=tool,
                    decision=decision, reason=reason, arg_keys=arg_keys, seq=seq, prev=self._prev,
                )
                digest = hashlib.sha256(text).hexdigest()
                # The fixed suffix verify() expects: the hash of every byte before it.
                data = text[:-1] + b',"hash":"' + digest.encode() + b'"}\n'
                written = os.write(fd, data)
                if written != len(data):
                    self._size = -1
                    raise AuditLogError(
                        f"short write to {self.path} ({written} of {len(data)} bytes; disk full?); "
                        "the last line is now incomplete: free space, then cut it before appending"
                    )
                if self.fsync:
                    os.fsync(fd)
                self._size = size + written
                self._seq = seq
                self._prev = digest
                if self.anchors:
                    self._pending = (digest, seq, ts, self._size)
                    now = time.monotonic()
                    if self.fsync or now >= self._anchor_due:
                        self._anchor_due = now + ANCHOR_INTERVAL_S
                        self._flush_locked()
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return ts

    def flush(self) -> None:
        """Anchor the newest record now (the host calls this at the end of every request)."""
        with self._lock:
            if self._pending is not None and self.anchors and self._pid == os.getpid():
                self._flush_locked()

    def _flush_locked(self) -> None:
        assert self._pending is not None
        head, seq, ts, end = self._pending
        for store in self.anchors:
            store.save(head, seq, ts, end)  # idempotent: a retry after one store failed re-saves all
        self._pending = None

    def _reopen_after_fork(self) -> None:
        # A forked child shares the parent's open file description, and so its
        # flock: it must get its own before it may append. The anchor stores open
        # their own connections again (a parent's is kept alive but never used here).
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._open()

    def close(self) -> None:
        """Anchor, then close the file; later ``record`` calls raise ``AuditLogError``. Idempotent."""
        with self._lock:
            mine = self._pid == os.getpid()
            try:
                if mine and self._pending is not None and self.anchors:
                    self._flush_locked()
            finally:
                if self._fd is not None:
                    if mine and self.fsync:
                        os.fsync(self._fd)
                    os.close(self._fd)
                    self._fd = None
                self._close_anchors()

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_last_line(fd: int, size: int) -> bytes:
    """The last line of the file (with its newline, if any), read backwards from the end."""
    end = size
    block = _TAIL_BLOCK
    buf = b""
    while True:
        start = max(0, end - block)
        buf = os.pread(fd, end - start, start) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1 :]
        if start == 0:
            return buf
        end = start
        block = min(block * 2, 1 << 20)


@attrs.frozen
class Anchor:
    """The anchor row of one log: the head and count written with its last append."""

    count: int
    head: str
    updated_at: float
    broken: str | None = None


def read_anchor(
    path: str | os.PathLike[str], home: str | os.PathLike[str] | None = None
) -> Anchor | str:
    """The anchor of the log at ``path`` in ``<home>/agentkeel.db`` (``home`` defaults to
    the log's directory), or why there is none. Opens the database read-only and
    never creates it. Raises ``AuditLogError`` when it exists but cannot be read."""
    base = Path(home) if home is not None else Path(path).parent
    db = db_path(base)
    if not db.is_file():
        return f"{db} does not exist"
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise AuditLogError(f"cannot open {db} to read the audit log's anchor: {exc}") from exc
    try:
        try:
            row = conn.execute(_SELECT_ANCHOR, (anchor_key(path, base),)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return f"{db} has no {ANCHOR_TABLE} table (nothing was appended since anchors exist)"
            raise AuditLogError(f"cannot read the audit log's anchor from {db}: {exc}") from exc
        except sqlite3.Error as exc:
            raise AuditLogError(f"cannot read the audit log's anchor from {db}: {exc}") from exc
    finally:
        conn.close()
    if row is None:
        return f"{db} holds no anchor for this log (nothing was appended since anchors exist)"
    count, head, updated_at, broken = row
    return Anchor(int(count), str(head), float(updated_at), broken)


@attrs.frozen
class VerifyResult:
    """The outcome of ``verify``.

    ``records`` counts the intact records before the first problem (all of them
    when the chain is intact); ``line`` is the 1-based number of the first bad
    line (None for a problem of the whole file); ``last_hash`` is the hash of the
    last intact record. ``anchored`` is True when the anchor in the database was
    found and matches the file; ``ok`` with ``anchored`` False means the chain is
    intact but nothing proves that records were not cut from the end or the
    whole file replaced: ``note`` says why. ``legacy_records`` counts format-1
    records (written before the ``v`` field).
    """

    ok: bool
    records: int
    problem: str | None = None
    line: int | None = None
    last_hash: str | None = None
    anchored: bool = False
    anchor_count: int | None = None
    anchor_head: str | None = None
    note: str | None = None
    legacy_records: int = 0


def verify(
    path: str | os.PathLike[str],
    *,
    home: str | os.PathLike[str] | None = None,
    anchor_store: AnchorStore | None = None,
) -> VerifyResult:
    """Check the audit log at ``path`` byte for byte, then against its anchor in
    ``<home>/agentkeel.db`` (``home`` defaults to the log's directory), or in
    ``anchor_store`` when given (``PostgresAnchor``); stop at the first problem."""
    file = Path(path)
    try:
        anchor = anchor_store.read() if anchor_store is not None else read_anchor(file, home)
    except AuditLogError as exc:
        return VerifyResult(False, 0, str(exc))
    anchored = isinstance(anchor, Anchor)
    a_count = anchor.count if isinstance(anchor, Anchor) else None
    a_head = anchor.head if isinstance(anchor, Anchor) else None
    note = None if isinstance(anchor, Anchor) else f"not anchored: {anchor}"

    def failed(problem: str, records: int, line: int | None, last: str | None, legacy: int) -> VerifyResult:
        return VerifyResult(False, records, problem, line, last, False, a_count, a_head, note, legacy)

    if not file.is_file():
        if isinstance(anchor, Anchor):
            return failed(
                f"{file} is missing, but its anchor records {anchor.count} record(s) "
                f"(head {anchor.head}): the log was deleted or moved",
                0, None, None, 0,
            )
        return failed(f"{file} does not exist or is not a file", 0, None, None, 0)
    prev = GENESIS
    count = 0
    legacy = 0
    version = LEGACY_FORMAT
    at_anchor: str | None = GENESIS if a_count == 0 else None
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            checked = _check_line(raw, count + 1, prev, version)
            if isinstance(checked, str):
                return failed(checked, count, number, prev if count else None, legacy)
            prev, version = checked
            count += 1
            legacy += version == LEGACY_FORMAT
            if count == a_count:
                at_anchor = prev
    last = prev if count else None
    if not isinstance(anchor, Anchor):
        return VerifyResult(True, count, None, None, last, False, None, None, note, legacy)
    if anchor.broken:
        return failed(f"the chain was broken before: {anchor.broken}", count, None, last, legacy)
    if count < anchor.count:
        return failed(
            f"the log has {count} record(s) but its anchor records {anchor.count} "
            f"(head {anchor.head}): records were cut from the end, or the file was emptied "
            "or replaced",
            count, None, last, legacy,
        )
    if at_anchor != anchor.head:
        return failed(
            f"record {anchor.count} has hash {at_anchor}, but the anchored head is {anchor.head}: "
            "the log was replaced by another chain",
            count, anchor.count, last, legacy,
        )
    if count > anchor.count:
        note = (
            f"{count - anchor.count} record(s) after the anchored head (record {anchor.count}) are not "
            "anchored yet: a writer anchors at the end of every request and at most "
            f"{ANCHOR_INTERVAL_S:g}s after an append, so these are in flight, or were left by a writer that "
            "stopped; cutting them would not be detected"
        )
        return VerifyResult(True, count, None, None, last, anchored, a_count, a_head, note, legacy)
    return VerifyResult(True, count, None, None, last, anchored, a_count, a_head, None, legacy)


class _Refused(ValueError):
    """A line the strict parser refuses (a duplicate key, a NaN constant)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Refused(f"duplicate key {key!r} (readers disagree on which value counts)")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _check_line(raw: bytes, seq: int, prev: str, version: int) -> str | tuple[str, int]:
    """What is wrong with ``raw`` as record number ``seq`` following ``prev`` (a line of
    format ``version``, or later), or its hash and format."""
    if not raw.endswith(b"\n"):
        return "incomplete last line (cut short, no newline)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    try:
        body = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Refused as exc:
        return f"refused: {exc}"
    except RecursionError:
        return "not an audit record (nested too deep)"
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(body, dict):
        return "not a JSON object"
    bad = jsonvalue.problem(body)
    if bad is not None:
        return f"refused: {bad.lstrip(': ')}"
    fields = LINE_FIELDS if "v" in body else LEGACY_LINE_FIELDS
    missing = [k for k in (*RECORD_FIELDS, *CHAIN_FIELDS) if k not in body]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    extra = sorted(set(body) - fields)
    if extra:
        return f"unexpected field(s) {', '.join(extra)}"
    line_version = body.get("v", LEGACY_FORMAT)
    if type(line_version) is not int or ("v" in body and line_version != FORMAT):
        return f"unknown format version {line_version!r} (this agentkeel writes {FORMAT})"
    wrong = _type_problem(body)
    if wrong:
        return wrong
    tail = _HASH_TAIL.search(raw)
    if tail is None:
        return (
            'the line does not end with the hash in its fixed form (,"hash":"<64 hex digits>"}): '
            "it was re-encoded or edited"
        )
    hashed = raw[: tail.start()] + b"}"
    if hashlib.sha256(hashed).hexdigest() != tail.group(1).decode():
        return "hash mismatch: the line's bytes were changed after it was written"
    if canonical({k: v for k, v in body.items() if k != "hash"}) != hashed:
        return (
            "not in canonical form (sorted keys, no spaces, no needless escapes) although its "
            "hash matches: agentkeel did not write this line"
        )
    if body["seq"] != seq:
        return f"sequence number {body['seq']!r} where {seq} was expected: a line was deleted, added or moved"
    if body["prev"] != prev:
        return "prev does not match the hash of the line before: a line was deleted, added or moved"
    if line_version < version:
        return (
            f"a format-{line_version} line after format-{version} lines: writers never go back "
            "to the old format, so the line was inserted"
        )
    return str(body["hash"]), line_version


def _type_problem(body: dict[str, Any]) -> str | None:
    for key in ("run_id", "principal", "action", "tool", "decision", "reason", "prev", "hash"):
        if type(body[key]) is not str:
            return f"field {key} is not a string"
    if type(body["seq"]) is not int or body["seq"] < 1:
        return "field seq is not a positive integer"
    ts = body["ts"]
    if type(ts) is not float or not math.isfinite(ts):
        return "field ts is not a number of seconds"
    keys = body["arg_keys"]
    if type(keys) is not list or any(type(k) is not str for k in keys):
        return "field arg_keys is not a list of strings"
    return None
