"""The hash-chained audit log: writing, verifying, tampering, several processes, the CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from agentkeel.cli.audit import audit
from agentkeel.config import Config
from agentkeel.permissions.audit import (
    FORMAT,
    GENESIS,
    RECORD_FIELDS,
    AuditLog,
    AuditLogError,
    canonical,
    default_path,
    line_hash,
    verify,
)
from agentkeel.types import AuditRecord
from click.testing import CliRunner


def write(log: AuditLog, n: int, *, start: int = 0) -> list[AuditRecord]:
    return [
        log.record(
            run_id=f"run{i}",
            principal="alice",
            action="authorize" if i % 2 else "tool_call",
            tool="refund_order",
            decision="allow" if i % 3 else "deny",
            reason=f"reason {i} — ünïcode",
            arg_keys=("order_id", "amount"),
        )
        for i in range(start, start + n)
    ]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def forged_line(row: dict[str, Any]) -> bytes:
    """``row`` as the writer lays a line out, with its hash recomputed: what a forger writes."""
    body = canonical({k: v for k, v in row.items() if k != "hash"})
    return body[:-1] + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        write(log, 6)
    return path


def test_records_form_a_chain_that_verifies(log_path: Path) -> None:
    rows = [json.loads(line) for line in lines(log_path)]

    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["prev"] == GENESIS
    for before, after in itertools.pairwise(rows):
        assert after["prev"] == before["hash"]
    for row in rows:
        assert row["hash"] == line_hash(row)
        assert set(row) == {*RECORD_FIELDS, "seq", "prev", "v", "hash"}
        assert row["v"] == FORMAT
    assert rows[0]["arg_keys"] == ["order_id", "amount"]

    result = verify(log_path)
    assert result.ok and result.records == 6 and result.problem is None and result.line is None
    assert result.last_hash == rows[-1]["hash"]
    assert result.anchored and result.anchor_count == 6 and result.anchor_head == rows[-1]["hash"]


def test_record_returns_the_audit_record(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log:
        before = time.time()
        rec = log.record(
            run_id="r",
            principal="p",
            action="a",
            tool="t",
            decision="deny",
            reason="why",
            arg_keys=["x"],
        )
    assert rec == AuditRecord(
        ts=rec.ts,
        run_id="r",
        principal="p",
        action="a",
        tool="t",
        decision="deny",
        reason="why",
        arg_keys=("x",),
    )
    assert rec.ts >= before
    assert json.loads(lines(tmp_path / "a.jsonl")[0])["ts"] == rec.ts


def test_empty_and_missing_files(tmp_path: Path) -> None:
    AuditLog(tmp_path / "empty.jsonl").close()
    assert verify(tmp_path / "empty.jsonl") == verify(tmp_path / "empty.jsonl")
    assert verify(tmp_path / "empty.jsonl").ok
    assert verify(tmp_path / "empty.jsonl").records == 0
    missing = verify(tmp_path / "nope.jsonl")
    assert not missing.ok and "does not exist" in (missing.problem or "")


def _edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, list):
        return [*value, "extra"]
    return str(value) + "x"


FIELDS = (*RECORD_FIELDS, "seq", "prev", "v", "hash")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("index", [0, 2, 5])
def test_editing_any_field_of_any_line_breaks_verification_there(
    log_path: Path, field: str, index: int
) -> None:
    raw = lines(log_path)
    row = json.loads(raw[index])
    row[field] = _edited(row[field])
    raw[index] = (json.dumps(row) + "\n").encode()
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)

    assert not result.ok
    assert result.line == index + 1
    assert result.records == index


def test_an_edit_with_a_recomputed_hash_breaks_the_next_line(log_path: Path) -> None:
    raw = lines(log_path)
    row = json.loads(raw[2])
    row["decision"] = "allow" if row["decision"] == "deny" else "deny"
    raw[2] = forged_line(row)
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line) == (False, 4)
    assert "prev" in (result.problem or "") or "sequence" in (result.problem or "")


def test_deleting_a_middle_line_breaks_it(log_path: Path) -> None:
    raw = lines(log_path)
    del raw[3]
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line, result.records) == (False, 4, 3)


def test_deleting_the_first_line_breaks_it(log_path: Path) -> None:
    log_path.write_bytes(b"".join(lines(log_path)[1:]))
    assert verify(log_path).line == 1


def test_reordering_lines_breaks_it(log_path: Path) -> None:
    raw = lines(log_path)
    raw[2], raw[3] = raw[3], raw[2]
    log_path.write_bytes(b"".join(raw))

    result = verify(log_path)
    assert (result.ok, result.line) == (False, 3)


def test_a_truncated_last_line_breaks_it(log_path: Path) -> None:
    data = log_path.read_bytes()
    log_path.write_bytes(data[:-20])

    result = verify(log_path)
    assert (result.ok, result.line, result.records) == (False, 6, 5)

    log_path.write_bytes(data[:-1])  # only the newline is missing
    assert verify(log_path).line == 6


def test_an_inserted_line_breaks_it(log_path: Path) -> None:
    raw = lines(log_path)
    forged = json.loads(raw[1])
    raw.insert(2, (json.dumps(forged) + "\n").encode())
    log_path.write_bytes(b"".join(raw))
    assert verify(log_path).line == 3


def test_reopening_continues_the_chain(log_path: Path) -> None:
    last = json.loads(lines(log_path)[-1])
    with AuditLog(log_path) as log:
        write(log, 3, start=100)

    rows = [json.loads(line) for line in lines(log_path)]
    assert rows[6]["seq"] == 7 and rows[6]["prev"] == last["hash"]
    result = verify(log_path)
    assert result.ok and result.records == 9


def test_tail_read_handles_lines_longer_than_a_block(tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    with AuditLog(path) as log:
        log.record(
            run_id="r", principal="p", action="a", tool="t", decision="allow", reason="x" * 20000
        )
        log.record(
            run_id="r", principal="p", action="a", tool="t", decision="allow", reason="y" * 9000
        )
    with AuditLog(path) as log:
        write(log, 1)
    result = verify(path)
    assert result.ok and result.records == 3


def test_two_writers_in_one_process_share_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "two.jsonl"
    a, b = AuditLog(path), AuditLog(path)
    try:
        for i in range(10):
            write(a if i % 2 else b, 1, start=i)
    finally:
        a.close()
        b.close()
    result = verify(path)
    assert result.ok and result.records == 10


def test_refuses_to_append_after_a_damaged_tail(log_path: Path) -> None:
    log_path.write_bytes(log_path.read_bytes()[:-10])
    with pytest.raises(AuditLogError, match="incomplete line"):
        AuditLog(log_path)

    log_path.write_bytes(b"not json at all\n")
    with pytest.raises(AuditLogError, match="not an audit record"):
        AuditLog(log_path)


def test_file_is_opened_append_only(log_path: Path) -> None:
    import fcntl

    log = AuditLog(log_path)
    try:
        assert log._fd is not None
        assert fcntl.fcntl(log._fd, fcntl.F_GETFL) & os.O_APPEND
    finally:
        log.close()
    assert log.closed
    with pytest.raises(AuditLogError, match="closed"):
        write(log, 1)


def test_fsync_option_writes_the_same_chain(tmp_path: Path) -> None:
    path = tmp_path / "sync.jsonl"
    with AuditLog(path, fsync=True) as log:
        write(log, 3)
    assert verify(path).ok and verify(path).records == 3


def test_default_location_is_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTKEEL_HOME", str(tmp_path))
    config = Config.from_dict({})
    assert default_path(config) == tmp_path / "audit.jsonl"
    with AuditLog.for_config(config) as log:
        write(log, 1)
    assert verify(tmp_path / "audit.jsonl").records == 1


_WRITER = """
import os, sys, time
from pathlib import Path
from agentkeel.permissions.audit import AuditLog
path, go, name, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
log = AuditLog(path)
Path(str(go) + "." + name).touch()  # ready
deadline = time.monotonic() + 30
while not os.path.exists(go):  # spin, so both writers start within microseconds
    if time.monotonic() > deadline:
        sys.exit("never told to start")
for i in range(count):
    log.record(run_id=f"{name}-{i}", principal=name, action="tool_call", tool="t",
               decision="allow", reason="concurrent", arg_keys=("a",))
log.close()
"""


def _race(path: Path, go: Path) -> int:
    """Two writer processes append 200 records each at once; return how often they alternated."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(go), name, "200"])
        for name in ("p1", "p2")
    ]
    deadline = time.monotonic() + 60
    # Wait until both writers have opened the log.
    while not all(Path(f"{go}.{name}").exists() for name in ("p1", "p2")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
            "a writer did not start"
        )
        time.sleep(0.005)
    go.touch()
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    names = [json.loads(line)["principal"] for line in lines(path)]
    return sum(1 for a, b in itertools.pairwise(names) if a != b)


def test_two_processes_appending_keep_one_chain(tmp_path: Path) -> None:
    # On a busy machine one writer may finish before the other starts, which
    # proves nothing; try again (a few times at most) until their writes interleave.
    for attempt in range(3):
        path = tmp_path / f"shared{attempt}.jsonl"
        go = tmp_path / f"go{attempt}"
        with AuditLog(path) as log:
            write(log, 1)  # both writers must continue an existing chain
        switches = _race(path, go)

        result = verify(path)
        assert result.ok, result
        assert result.records == 401
        assert result.anchored and result.anchor_count == 401  # the anchor moved under the same lock
        rows = [json.loads(line) for line in lines(path)]
        for name in ("p1", "p2"):
            assert [r["run_id"] for r in rows if r["principal"] == name] == [
                f"{name}-{i}" for i in range(200)
            ]
        if switches >= 2:  # the writers overlapped in time
            break


def test_a_forked_child_gets_its_own_lock(tmp_path: Path) -> None:
    """A child shares its parent's open file, and so its flock: it must reopen to append."""
    path = tmp_path / "fork.jsonl"
    log = AuditLog(path)
    write(log, 2)
    pid = os.fork()
    if pid == 0:  # child: append, then leave without running pytest's teardown
        code = 0
        try:
            write(log, 300, start=1000)
            log.close()
        except BaseException:  # noqa: BLE001 - the child must reach os._exit
            code = 2
        os._exit(code)
    write(log, 300, start=2000)  # at the same time as the child
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log.close()
    result = verify(path)
    assert result.ok, result
    assert result.records == 602
    assert result.anchored and result.anchor_count == 602


# --- CLI ------------------------------------------------------------------------------


def test_cli_verify_intact(log_path: Path) -> None:
    result = CliRunner().invoke(audit, ["verify", str(log_path)])
    assert result.exit_code == 0, result.output
    assert "chain intact" in result.output and "6 record" in result.output


def test_cli_verify_names_the_first_bad_line(log_path: Path) -> None:
    raw = lines(log_path)
    del raw[2]
    log_path.write_bytes(b"".join(raw))

    result = CliRunner().invoke(audit, ["verify", str(log_path)])
    assert result.exit_code == 1
    assert "line 3" in result.output

    as_json = CliRunner().invoke(audit, ["verify", str(log_path), "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.output) | {"problem": None, "path": None} == {
        "path": None,
        "ok": False,
        "records": 2,
        "problem": None,
        "line": 3,
        "last_hash": json.loads(raw[1])["hash"],
        "anchored": False,
        "anchor_count": 6,
        "anchor_head": json.loads(raw[-1])["hash"],
        "note": None,
        "legacy_records": 0,
    }


def test_cli_verify_finds_the_log_through_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTKEEL_HOME", raising=False)
    home = tmp_path / "state"
    config_file = tmp_path / "agentkeel.toml"
    config_file.write_text(f'home = "{home}"\n')
    with AuditLog(home / "audit.jsonl") as log:
        write(log, 4)

    result = CliRunner().invoke(audit, ["verify", "--config", str(config_file), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["records"] == 4

    bad = CliRunner().invoke(audit, ["verify", "--config", str(tmp_path / "missing.toml")])
    assert bad.exit_code == 1 and "does not exist" in bad.output


def test_cli_as_a_subprocess(log_path: Path) -> None:
    code = "from agentkeel.cli.audit import audit; audit(prog_name='agentkeel audit')"
    ok = subprocess.run(
        [sys.executable, "-c", code, "verify", str(log_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr

    log_path.write_bytes(log_path.read_bytes()[:-5])
    bad = subprocess.run(
        [sys.executable, "-c", code, "verify", str(log_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 1
    assert "line 6" in bad.stderr and "incomplete" in bad.stderr


def test_agentkeel_audit_verify_through_the_main_cli(log_path: Path) -> None:
    cmd = [sys.executable, "-m", "agentkeel", "audit", "verify", str(log_path)]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr

    raw = lines(log_path)
    raw[3], raw[4] = raw[4], raw[3]
    log_path.write_bytes(b"".join(raw))
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode == 1, bad.stderr
    assert "line 4" in bad.stderr
