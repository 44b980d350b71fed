"""``agentkeel audit verify``: byte-exact lines and the anchor in agentkeel.db, as the
operator sees them (the message names the line or the reason; the exit code is 1)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from agentkeel.cli.audit import audit
from agentkeel.permissions.audit import AuditLog, canonical
from click.testing import CliRunner, Result

from tests.cli.helpers import agentkeel


def write(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.record(run_id=f"r{i}", principal="alice", action="tool_call", tool="refund",
                   decision="allow", reason="granted", arg_keys=("order_id",))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "home" / "audit.jsonl"
    with AuditLog(path) as log:
        write(log, 5)
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(audit, ["verify", *args])


def test_an_intact_anchored_log(log_path: Path) -> None:
    result = run(str(log_path))
    assert result.exit_code == 0, result.output
    assert "chain intact and matches its anchor, 5 record(s)" in result.output

    as_json = json.loads(run(str(log_path), "--json").output)
    assert as_json["ok"] and as_json["anchored"] and as_json["anchor_count"] == 5
    assert as_json["anchor_head"] == as_json["last_hash"]


def test_a_whitespace_edit_names_the_line(log_path: Path) -> None:
    raw = lines(log_path)
    raw[1] = raw[1].replace(b'"tool":"refund"', b'"tool": "refund"')
    log_path.write_bytes(b"".join(raw))
    result = run(str(log_path))
    assert result.exit_code == 1
    assert "line 2: hash mismatch" in result.output and "1 intact record(s) before it" in result.output


def test_a_key_order_edit_names_the_line(log_path: Path) -> None:
    raw = lines(log_path)
    raw[2] = raw[2].replace(b'"action":"tool_call","arg_keys":["order_id"]',
                            b'"arg_keys":["order_id"],"action":"tool_call"')
    log_path.write_bytes(b"".join(raw))
    result = run(str(log_path))
    assert result.exit_code == 1 and "line 3: hash mismatch" in result.output


def test_a_duplicate_key_names_the_line_and_the_key(log_path: Path) -> None:
    raw = lines(log_path)
    raw[3] = raw[3].replace(b'"decision":"allow"', b'"decision":"deny","decision":"allow"')
    log_path.write_bytes(b"".join(raw))
    result = run(str(log_path))
    assert result.exit_code == 1
    assert "line 4: refused: duplicate key 'decision'" in result.output


@pytest.mark.parametrize("keep", [4, 0])
def test_truncation_and_emptying_fail(log_path: Path, keep: int) -> None:
    log_path.write_bytes(b"".join(lines(log_path)[:keep]))
    result = run(str(log_path))
    assert result.exit_code == 1
    assert f"has {keep} record(s) but its anchor records 5" in result.output


def test_deletion_fails(log_path: Path) -> None:
    log_path.unlink()
    result = run(str(log_path))
    assert result.exit_code == 1
    assert "missing, but its anchor records 5 record(s)" in result.output


def test_a_rechained_forgery_fails(log_path: Path) -> None:
    out, prev = [], "0" * 64
    for seq, line in enumerate(lines(log_path), start=1):
        row = {k: v for k, v in json.loads(line).items() if k != "hash"}
        body = canonical({**row, "decision": "deny", "seq": seq, "prev": prev})
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
    log_path.write_bytes(b"".join(out))
    result = run(str(log_path))
    assert result.exit_code == 1
    assert "line 5: record 5 has hash" in result.output and "replaced by another chain" in result.output


def test_a_log_without_an_anchor_says_so(log_path: Path, tmp_path: Path) -> None:
    result = run(str(log_path), "--home", str(tmp_path / "nowhere"))
    assert result.exit_code == 0, result.output
    assert "chain intact, 5 record(s)" in result.output and "NOT anchored" in result.output
    assert "would not be detected" in result.output

    strict = run(str(log_path), "--home", str(tmp_path / "nowhere"), "--require-anchor")
    assert strict.exit_code == 1 and "NOT anchored" in strict.output
    as_json = json.loads(run(str(log_path), "--home", str(tmp_path / "nowhere"), "--json").output)
    assert as_json["ok"] and not as_json["anchored"] and "does not exist" in as_json["note"]


def test_the_main_cli_checks_the_anchor_in_agentkeel_home(workdir: Path, isolated_home: Path) -> None:
    home = isolated_home
    with AuditLog(home / "audit.jsonl") as log:
        write(log, 3)
    ok = agentkeel("audit", "verify", cwd=workdir)
    assert ok.returncode == 0, ok.stderr
    assert "matches its anchor, 3 record(s)" in ok.stdout

    (home / "audit.jsonl").write_bytes(b"".join(lines(home / "audit.jsonl")[:2]))
    bad = agentkeel("audit", "verify", cwd=workdir)
    assert bad.returncode == 1
    assert "has 2 record(s) but its anchor records 3" in bad.stderr
