"""The append-only, hash-chained audit log (``<home>/audit.jsonl``).

Every permission decision and every tool call becomes one JSON line: the fields
of an ``AuditRecord`` plus ``seq`` (1, 2, 3, ...), ``prev`` (the ``hash`` of the
line before, ``GENESIS`` for the first) and ``hash``, the SHA-256 of the
canonical JSON of the line without ``hash`` (sorted keys, no spaces, UTF-8).
Changing, deleting, reordering or cutting a line breaks the chain at that line,
which ``verify`` reports. (Removing lines from the *end* leaves a shorter valid
chain; compare ``VerifyResult.last_hash`` with a copy kept elsewhere to catch it.)

Writers: the file is opened with ``O_APPEND`` and each record is one ``write``
under an exclusive ``flock``, so several processes appending to one file keep a
single chain. A writer remembers the file size after its own last write and
re-reads the last line (seeking from the end) only when another writer has
appended since; the usual cost per record is a lock, an ``fstat`` and a write.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import attrs

from agentkeel.errors import AuditLogError
from agentkeel.types import AuditRecord

if TYPE_CHECKING:
    from agentkeel.config import Config

AUDIT_FILENAME = "audit.jsonl"
GENESIS = "0" * 64
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in attrs.fields(AuditRecord))
CHAIN_FIELDS = ("seq", "prev", "hash")
_TAIL_BLOCK = 4096



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
    """``canonical()`` of one record, written out directly: keys in sorted order, the
    same string and float encoders. About five times cheaper than the general
    encoder, and it runs for every permission decision and tool call."""
    keys = ",".join(map(_str, arg_keys))
    return (
        f'{{"action":{_str(action)},"arg_keys":[{keys}],"decision":{_str(decision)},'
        f'"prev":{_str(prev)},"principal":{_str(principal)},"reason":{_str(reason)},'
        f'"run_id":{_str(run_id)},"seq":{seq},"tool":{_str(tool)},"ts":{float.__repr__(ts)}}}'
    ).encode()


def line_hash(body: dict[str, Any]) -> str:
    """The hash of one line's fields, ``hash`` excluded."""
    return hashlib.sha256(canonical({k: v for k, v in body.items() if k != "hash"})).hexdigest()


class AuditLog:
    """Appends hash-chained records to ``path``. Thread-safe and multi-process safe.

    Opening continues the chain found in the file. ``fsync=True`` makes every
    record durable before ``record`` returns (much slower); otherwise a record
    is handed to the kernel with one ``write`` and survives a process crash,
    not a power cut. Raises ``AuditLogError`` when the file ends in a damaged
    line (an interrupted write): appending after it would hide where it broke.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._size = -1  # file size after our last write; -1 forces a re-read
        self._seq = 0
        self._prev = GENESIS
        self._open()

    @classmethod
    def for_config(cls, config: Config, *, fsync: bool = False) -> AuditLog:
        return cls(default_path(config), fsync=fsync)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._pid = os.getpid()
        self._size = -1
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._sync_tail(os.fstat(self._fd).st_size)
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_tail(self, size: int) -> None:
        """Take ``seq`` and ``prev`` from the last line of a file of ``size`` bytes."""
        assert self._fd is not None
        if size == 0:
            self._seq, self._prev = 0, GENESIS
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
                seq, prev = body["seq"], body["hash"]
                if not isinstance(seq, int) or not isinstance(prev, str):
                    raise TypeError("seq must be an integer and hash a string")
            except (ValueError, KeyError, TypeError) as exc:
                raise AuditLogError(
                    f"the last line of {self.path} is not an audit record ({exc}); "
                    f"run `agentkeel audit verify {self.path}` and move the file aside"
                ) from exc
            self._seq, self._prev = seq, prev
        self._size = size

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
        """Append one record and return it. One ``write`` per record; see the class docs."""
        rec = AuditRecord(
            ts=time.time(),
            run_id=run_id,
            principal=principal,
            action=action,
            tool=tool,
            decision=decision,
            reason=reason,
            arg_keys=tuple(arg_keys),
        )
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
                    ts=rec.ts, run_id=run_id, principal=principal, action=action, tool=tool,
                    decision=decision, reason=reason, arg_keys=rec.arg_keys, seq=seq, prev=self._prev,
                )
                digest = hashlib.sha256(text).hexdigest()
                # Key order does not matter to verify(), so append "hash" without re-encoding.
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
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return rec

    def _reopen_after_fork(self) -> None:
        # A forked child shares the parent's open file description, and so its
        # flock: it must get its own before it may append.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._open()

    def close(self) -> None:
        """Close the file; later ``record`` calls raise ``AuditLogError``. Idempotent."""
        with self._lock:
            if self._fd is not None:
                if self._pid == os.getpid() and self.fsync:
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

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
class VerifyResult:
    """The outcome of ``verify``.

    ``records`` counts the intact records before the first problem (all of them
    when ``ok``); ``line`` is the 1-based number of the first bad line;
    ``last_hash`` is the hash of the last intact record (keep it elsewhere to
    detect lines cut from the end later).
    """

    ok: bool
    records: int
    problem: str | None = None
    line: int | None = None
    last_hash: str | None = None


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check the whole chain of the audit log at ``path``; stop at the first bad line."""
    file = Path(path)
    if not file.is_file():
        return VerifyResult(False, 0, f"{file} does not exist or is not a file", None)
    prev = GENESIS
    count = 0
    with file.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            problem = _check_line(raw, count + 1, prev)
            if isinstance(problem, str):
                return VerifyResult(False, count, problem, number, prev if count else None)
            prev = problem["hash"]
            count += 1
    return VerifyResult(True, count, None, None, prev if count else None)


def _check_line(raw: bytes, seq: int, prev: str) -> str | dict[str, Any]:
    """What is wrong with ``raw`` as record number ``seq`` following ``prev``, or the parsed record."""
    if not raw.endswith(b"\n"):
        return "incomplete last line (cut short, no newline)"
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return f"not valid JSON ({exc})"
    if not isinstance(body, dict):
        return "not a JSON object"
    missing = [k for k in (*RECORD_FIELDS, *CHAIN_FIELDS) if k not in body]
    if missing:
        return f"missing field(s) {', '.join(missing)}"
    extra = sorted(set(body) - set(RECORD_FIELDS) - set(CHAIN_FIELDS))
    if extra:
        return f"unexpected field(s) {', '.join(extra)}"
    if body["hash"] != line_hash(body):
        return "hash mismatch: the record was changed after it was written"
    if body["seq"] != seq:
        return f"sequence number {body['seq']!r} where {seq} was expected: a line was deleted, added or moved"
    if body["prev"] != prev:
        return "prev does not match the hash of the line before: a line was deleted, added or moved"
    return body
