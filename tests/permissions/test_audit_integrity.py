"""The audit log is verified byte for byte and against its anchor in agentkeel.db.

Every tampering here went unnoticed by a verifier that hashed the parsed object
and trusted whatever chain the file held: edits that keep the JSON value
(whitespace, key order, a duplicate key), lines cut from the end, an emptied,
deleted or fully re-chained file.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from agentkeel.permissions.audit import (
    ANCHOR_TABLE,
    FORMAT,
    GENESIS,
    AuditLog,
    canonical,
    read_anchor,
    verify,
)
from agentkeel.stores import db_path


def write(log: AuditLog, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record(
            run_id=f"run{i}",
            principal="alice",
            action="tool_call",
            tool="refund_order",
            decision="allow",
            reason=f"reason {i} — ünïcode",
            arg_keys=("order_id", "amount"),
        )


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def seal(body: bytes) -> bytes:
    """A line from its body bytes, laid out as the writer does, with a correct hash."""
    return body[:-1] + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


def body_of(line: bytes) -> bytes:
    """The bytes a line's hash covers: the line without its fixed hash suffix."""
    return line[:-76] + b"}"


def chain(rows: list[dict[str, Any]], *, version: int | None = FORMAT) -> bytes:
    """A freshly chained log of ``rows`` (AuditRecord fields): what a forger would write."""
    out, prev = [], GENESIS
    for seq, row in enumerate(rows, start=1):
        body = {**row, "seq": seq, "prev": prev}
        if version is not None:
            body["v"] = version
        line = seal(canonical(body))
        prev = json.loads(line)["hash"]
        out.append(line)
    return b"".join(out)


def record_fields(line: bytes) -> dict[str, Any]:
    row = json.loads(line)
    return {k: v for k, v in row.items() if k not in ("seq", "prev", "hash", "v")}


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        write(log, 6)
    return path


def test_a_normal_log_verifies_and_matches_its_anchor(log_path: Path) -> None:
    result = verify(log_path)
    assert result.ok and result.anchored, result
    assert (result.records, result.anchor_count) == (6, 6)
    assert result.anchor_head == result.last_hash == json.loads(lines(log_path)[-1])["hash"]
    assert result.note is None and result.legacy_records == 0
    # The anchor lives in the journal's database, keyed by the log's path under home.
    with sqlite3.connect(db_path(log_path.parent)) as db:
        rows = db.execute(f"SELECT log_path, count, head, broken FROM {ANCHOR_TABLE}").fetchall()
    assert rows == [("audit.jsonl", 6, result.last_hash, None)]


def test_every_line_ends_in_the_hash_of_its_own_bytes(log_path: Path) -> None:
    for line in lines(log_path):
        assert line.endswith(b'"}\n') and line[-76:-67] == b',"hash":"'
        assert json.loads(line)["hash"] == hashlib.sha256(body_of(line)).hexdigest()
        assert json.loads(line)["v"] == FORMAT


# --- edits that keep the parsed value -----------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b'"decision":"allow"', b'"decision": "allow"'),  # a space after a colon
        (b'"arg_keys":["order_id","amount"]', b'"arg_keys":["order_id", "amount"]'),
        (b'{"action"', b'{ "action"'),
    ],
)
def test_a_whitespace_edit_fails_at_that_line(log_path: Path, before: bytes, after: bytes) -> None:
    raw = lines(log_path)
    assert before in raw[2]
    raw[2] = raw[2].replace(before, after, 1)
    assert json.loads(raw[2]) == json.loads(lines(log_path)[2])  # the same value
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert not result.ok
    assert (result.line, result.records) == (3, 2)
    assert "hash mismatch" in (result.problem or "")


def test_whitespace_after_the_hash_fails(log_path: Path) -> None:
    raw = lines(log_path)
    raw[4] = raw[4][:-2] + b' }\n'
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line) == (False, 5)
    assert "fixed form" in (result.problem or "")


def test_a_key_order_edit_fails_at_that_line(log_path: Path) -> None:
    raw = lines(log_path)
    row = json.loads(raw[1])
    reordered = {"tool": row["tool"], **{k: v for k, v in row.items() if k not in ("tool", "hash")}}
    raw[1] = (
        json.dumps(reordered, separators=(",", ":"), ensure_ascii=False)[:-1]
        + f',"hash":"{row["hash"]}"}}\n'
    ).encode()
    assert json.loads(raw[1]) == row
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line, result.records) == (False, 2, 1)
    assert "hash mismatch" in (result.problem or "")


def test_moving_the_hash_field_fails(log_path: Path) -> None:
    raw = lines(log_path)
    row = json.loads(raw[3])
    moved = {"hash": row["hash"], **{k: v for k, v in row.items() if k != "hash"}}
    raw[3] = (json.dumps(moved, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line) == (False, 4)
    assert "fixed form" in (result.problem or "")


def test_a_duplicate_key_fails_even_with_a_hash_over_the_bytes(log_path: Path) -> None:
    """``"decision":"deny"`` before the real ``"allow"``: json.loads keeps the last value,
    grep sees deny. Refused whether or not the forger rehashed the line."""
    raw = lines(log_path)
    planted = raw[-1].replace(b'"decision":"allow"', b'"decision":"deny","decision":"allow"', 1)
    assert json.loads(planted)["decision"] == "allow"
    for line in (planted, seal(body_of(planted))):
        log_path.write_bytes(b"".join([*raw[:-1], line]))
        result = verify(log_path)
        assert (result.ok, result.line, result.records) == (False, 6, 5)
        assert "duplicate key 'decision'" in (result.problem or "")


# --- lines that are not text, or not plain JSON ---------------------------------------------


def _replace_last(path: Path, old: bytes, new: bytes) -> None:
    """Edit the last line and give it a hash over its new bytes (nothing else can catch it)."""
    raw = lines(path)
    assert old in raw[-1]
    raw[-1] = seal(body_of(raw[-1]).replace(old, new, 1))
    path.write_bytes(b"".join(raw))


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (b"\xff", "not valid UTF-8"),
        (b"\xed\xa0\x80", "not valid UTF-8"),  # a surrogate encoded as if it were a character
        (b"\\ud800", "lone surrogate"),  # the same as a JSON escape: valid bytes, no text
    ],
)
def test_lines_that_are_not_text_fail(log_path: Path, new: bytes, reason: str) -> None:
    _replace_last(log_path, b"reason 5", b"reason " + new)
    result = verify(log_path)
    assert (result.ok, result.line) == (False, 6)
    assert reason in (result.problem or "")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_numbers_fail(log_path: Path, constant: bytes) -> None:
    ts = b'"ts":' + str(json.loads(lines(log_path)[-1])["ts"]).encode()
    _replace_last(log_path, ts, b'"ts":' + constant)
    result = verify(log_path)
    assert (result.ok, result.line) == (False, 6)
    assert "is not a JSON number" in (result.problem or "")


def test_a_needless_escape_fails_even_with_a_hash_over_the_bytes(log_path: Path) -> None:
    _replace_last(log_path, b'"decision":"allow"', b'"decision":"\\u0061llow"')
    result = verify(log_path)
    assert (result.ok, result.line) == (False, 6)
    assert "canonical form" in (result.problem or "")


def test_a_lone_surrogate_in_a_record_is_written_as_a_replacement_character(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.record(run_id="r", principal="p", action="a", tool="t\udc80", decision="allow", reason="x")
    assert json.loads(lines(path)[0])["tool"] == "t\ufffd"
    assert verify(path).ok and verify(path).anchored


# --- truncation, deletion, replacement ------------------------------------------------------


def test_removing_the_last_line_fails(log_path: Path) -> None:
    log_path.write_bytes(b"".join(lines(log_path)[:-1]))
    result = verify(log_path)
    assert not result.ok and result.records == 5
    assert "5 record(s) but its anchor records 6" in (result.problem or "")


def test_an_emptied_log_fails(log_path: Path) -> None:
    log_path.write_bytes(b"")
    result = verify(log_path)
    assert not result.ok and result.records == 0
    assert "0 record(s) but its anchor records 6" in (result.problem or "")
    assert "emptied" in (result.problem or "")


def test_a_deleted_log_fails(log_path: Path) -> None:
    log_path.unlink()
    result = verify(log_path)
    assert not result.ok
    assert "missing, but its anchor records 6 record(s)" in (result.problem or "")
    assert "deleted" in (result.problem or "")


@pytest.mark.parametrize("count", [6, 4, 9])
def test_a_fully_rechained_forgery_fails(log_path: Path, count: int) -> None:
    """Every line of the forgery is a valid format-2 line and the chain is intact;
    only the anchor tells it from the original."""
    rows = [record_fields(line) for line in lines(log_path)]
    forged = [{**row, "decision": "deny"} for row in rows] + [rows[0]] * 3
    log_path.write_bytes(chain(forged[:count]))

    result = verify(log_path)
    assert not result.ok
    problem = result.problem or ""
    if count < 6:
        assert f"{count} record(s) but its anchor records 6" in problem
    else:
        assert result.line == 6
        assert "replaced by another chain" in problem


def test_deleting_the_log_is_still_reported_after_the_next_run_starts_a_new_chain(
    log_path: Path,
) -> None:
    log_path.unlink()
    with AuditLog(log_path) as log:
        write(log, 2)

    result = verify(log_path)
    assert not result.ok
    # The new chain itself is intact; the anchor never moves backwards, so it still counts 6.
    assert result.records == 2 and result.anchor_count == 6
    problem = result.problem or ""
    assert "the chain was broken before" in problem
    assert "found 0 record(s)" in problem and "anchor had 6" in problem


def test_truncating_then_appending_is_still_reported(log_path: Path) -> None:
    log_path.write_bytes(b"".join(lines(log_path)[:3]))
    with AuditLog(log_path) as log:
        write(log, 1)
    result = verify(log_path)
    assert not result.ok and "found 3 record(s)" in (result.problem or "")


def test_a_writer_with_the_log_open_sees_the_truncation_too(log_path: Path) -> None:
    """A writer that has the log open re-reads the tail when the size changed under it."""
    with AuditLog(log_path) as log:
        write(log, 1)
        log_path.write_bytes(b"".join(lines(log_path)[:2]))  # behind the writer's back
        write(log, 1)
    assert "found 2 record(s)" in (verify(log_path).problem or "")


def test_a_line_written_but_not_anchored_is_reported_then_taken_up(log_path: Path) -> None:
    """What a writer killed before anchoring leaves behind (or a request still in flight)."""
    with AuditLog(log_path, anchor=False) as log:
        write(log, 1)
    result = verify(log_path)
    assert result.ok and result.anchor_count == 6 and result.records == 7
    assert "1 record(s) after the anchored head (record 6) are not anchored yet" in (result.note or "")

    with AuditLog(log_path) as log:
        write(log, 1)
    result = verify(log_path)
    assert result.ok and result.anchored and result.records == 8


# --- no anchor --------------------------------------------------------------------------------


def test_without_a_database_verify_says_the_log_is_not_anchored(log_path: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "other-home"
    result = verify(log_path, home=elsewhere)
    assert result.ok and not result.anchored and result.records == 6
    assert result.note and "not anchored" in result.note and "does not exist" in result.note
    assert not db_path(elsewhere).exists()  # verify never creates the database


def test_a_log_never_appended_to_since_anchors_exist_is_not_anchored(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    AuditLog(path).close()
    result = verify(path)
    assert result.ok and not result.anchored
    assert "no anchor for this log" in (result.note or "")
    assert read_anchor(path) == result.note.removeprefix("not anchored: ")  # type: ignore[union-attr]


# --- the previous format ----------------------------------------------------------------------


def _legacy_rows(n: int) -> list[dict[str, Any]]:
    return [
        {"ts": 1700000000.0 + i, "run_id": f"old{i}", "principal": "bob", "action": "tool_call",
         "tool": "t", "decision": "allow", "reason": "old", "arg_keys": ["a"]}
        for i in range(n)
    ]


def test_a_log_in_the_previous_format_verifies_byte_for_byte_and_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(chain(_legacy_rows(3), version=None))  # how the previous writer laid lines out
    result = verify(path)
    assert result.ok and result.legacy_records == 3 and not result.anchored

    with AuditLog(path) as log:
        write(log, 2)
    result = verify(path)
    assert result.ok and result.anchored
    assert (result.records, result.legacy_records) == (5, 3)
    assert json.loads(lines(path)[3])["prev"] == json.loads(lines(path)[2])["hash"]

    raw = lines(path)
    raw[1] = raw[1].replace(b'"reason":"old"', b'"reason": "old"')  # old lines get the same check
    path.write_bytes(b"".join(raw))
    assert (verify(path).line, "hash mismatch" in (verify(path).problem or "")) == (2, True)


def test_a_previous_format_line_after_a_new_one_fails(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path, anchor=False) as log:
        write(log, 2)
    last = json.loads(lines(path)[-1])
    old = seal(canonical({**_legacy_rows(1)[0], "seq": 3, "prev": last["hash"]}))
    path.write_bytes(path.read_bytes() + old)
    result = verify(path)
    assert (result.ok, result.line) == (False, 3)
    assert "format-1 line after format-2 lines" in (result.problem or "")


def test_an_unknown_format_version_fails(log_path: Path) -> None:
    _replace_last(log_path, b'"v":2', b'"v":3')
    result = verify(log_path)
    assert (result.ok, result.line) == (False, 6)
    assert "unknown format version 3" in (result.problem or "")


def test_a_writer_anchors_once_per_request_not_per_record(log_path: Path) -> None:
    """Records are anchored by flush (the end of a request) or close, not one commit each."""
    with AuditLog(log_path) as log:
        log.flush()
        write(log, 3)  # the first of these may anchor (the interval elapsed); the rest wait
        pending = verify(log_path)
        assert pending.ok and pending.records == 9
        log.flush()
        flushed = verify(log_path)
        assert flushed.ok and flushed.anchored and flushed.anchor_count == 9 and flushed.note is None


def test_a_longer_forgery_is_refused_by_the_next_writer_too(log_path: Path) -> None:
    """A replacement with more records than anchored: the writer checks the anchored record's
    place (one read at its offset) and marks the chain broken instead of anchoring the forgery."""
    forged = tmp = log_path.with_name("forged.jsonl")
    with AuditLog(tmp, anchor=False) as other:
        write(other, 9)
    log_path.write_bytes(forged.read_bytes())
    with AuditLog(log_path) as log:
        write(log, 1)
    result = verify(log_path)
    assert not result.ok and "the chain was broken before" in (result.problem or "")
