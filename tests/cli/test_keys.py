"""``agentkeel keys create|list|revoke`` as an operator runs them: the secret once, on stdout
alone; listings that never show it; the refusals as one line and exit code 2; the audit log."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from agentkeel.permissions.keys import parse_secret
from agentkeel.permissions.keys_sqlite import SQLiteKeyStore

from tests.cli.helpers import agentkeel, errors

CONFIG = """\
[principals.alice]
permissions = ["read"]

[principals.bob]
permissions = ["read", "refunds"]

[budget]
timezone = "UTC"
"""
SECRET = re.compile(r"ak_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")


@pytest.fixture
def project(workdir: Path) -> Path:
    (workdir / "agentkeel.toml").write_text(CONFIG)
    return workdir


def home() -> Path:
    return Path(os.environ["AGENTKEEL_HOME"])


def audit_records() -> list[dict[str, Any]]:
    path = home() / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def create(project: Path, *args: str) -> tuple[str, str]:
    """Create a key; return its secret and key id."""
    proc = agentkeel("keys", "create", *args, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    secret = proc.stdout.splitlines()[0]
    parsed = parse_secret(secret)
    assert parsed is not None, proc.stdout
    return secret, parsed[0]


def listed(project: Path, *args: str) -> list[dict[str, Any]]:
    proc = agentkeel("keys", "list", "--json", *args, cwd=project)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert isinstance(result, list)
    return result


def test_create_prints_the_secret_once_on_stdout_alone_and_it_authenticates(project: Path) -> None:
    proc = agentkeel("keys", "create", "--principal", "alice", "--name", "ci bot", "--rate-limit", "2.5",
                     cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert SECRET.fullmatch(proc.stdout.splitlines()[0]), proc.stdout
    assert proc.stdout.count("ak_") == 1 and proc.stdout.strip() == proc.stdout.splitlines()[0]
    secret = proc.stdout.strip()
    parsed = parse_secret(secret)
    assert parsed is not None
    key_id, token = parsed
    assert f"this key is shown once; store it now (key id {key_id}, principal alice)" in proc.stderr
    assert token not in proc.stderr

    store = SQLiteKeyStore(home())  # the file `agentkeel serve` reads
    try:
        result = store.authenticate(secret)
        assert result.reason == "ok" and result.key is not None
        assert result.key.principal == "alice" and result.key.name == "ci bot" and result.key.rate_limit == 2.5
    finally:
        store.close()


def test_create_json_holds_the_secret_and_the_record(project: Path) -> None:
    proc = agentkeel("keys", "create", "--principal", "bob", "--expires", "2099-01-02T03:04", "--json", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert SECRET.fullmatch(data["key"])
    assert data["key_id"] == data["key"][3:15] and data["principal"] == "bob" and data["state"] == "active"
    assert data["expires_at"] == 4071006240.0  # 2099-01-02 03:04 in [budget] timezone (UTC)
    assert data["revoked_at"] is None and data["rate_limit"] is None and data["name"] == ""
    assert set(data) == {"key", "key_id", "principal", "name", "created_at", "expires_at", "revoked_at",
                         "rate_limit", "last_used_at", "state"}


def test_list_shows_every_key_and_never_a_secret(project: Path) -> None:
    alice, alice_id = create(project, "--principal", "alice", "--name", "first")
    bob, bob_id = create(project, "--principal", "bob", "--rate-limit", "3")
    rows = listed(project)
    assert [row["key_id"] for row in rows] == [bob_id, alice_id]  # newest first
    assert rows[0]["rate_limit"] == 3.0 and rows[1]["name"] == "first"
    assert all(row["state"] == "active" for row in rows)
    assert [row["key_id"] for row in listed(project, "--principal", "alice")] == [alice_id]
    assert listed(project, "--principal", "carol") == []

    as_json = agentkeel("keys", "list", "--json", cwd=project).stdout
    table = agentkeel("keys", "list", cwd=project)
    assert table.returncode == 0, table.stderr
    for secret in (alice, bob):
        token = secret[16:]
        for output in (as_json, table.stdout, table.stderr):
            assert token not in output and secret not in output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["key", "id", "principal", "name", "state", "created", "expires", "last", "used",
                                "rate", "limit"]
    assert lines[1].startswith(bob_id) and "active" in lines[1] and "3/s" in lines[1]
    assert lines[2].startswith(alice_id) and "first" in lines[2]

    empty = agentkeel("keys", "list", "--principal", "carol", cwd=project)
    assert empty.returncode == 0 and "no API keys of principal carol" in empty.stdout


def test_revoke_refuses_the_key_from_then_on(project: Path) -> None:
    secret, key_id = create(project, "--principal", "alice")
    _, other_id = create(project, "--principal", "alice")
    proc = agentkeel("keys", "revoke", key_id, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"revoked key {key_id} (principal alice)" in proc.stdout
    states = {row["key_id"]: row["state"] for row in listed(project)}
    assert states == {key_id: "revoked", other_id: "active"}
    store = SQLiteKeyStore(home())
    try:
        assert store.authenticate(secret).reason == "revoked"
        first = store.get(key_id)
    finally:
        store.close()
    assert first is not None and first.revoked_at is not None

    again = agentkeel("keys", "revoke", key_id, "--json", cwd=project)  # twice: the first revocation stays
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["revoked_at"] == first.revoked_at
    assert "revoked" in agentkeel("keys", "list", cwd=project).stdout


def test_revoking_an_unknown_key_is_one_line_and_exit_code_2(project: Path) -> None:
    proc = agentkeel("keys", "revoke", "0123456789ab", cwd=project)
    assert proc.returncode == 2
    assert errors(proc) == ["error: no API key 0123456789ab (`agentkeel keys list` shows them)"]
    assert audit_records() == []


def test_an_unknown_principal_is_refused(project: Path) -> None:
    proc = agentkeel("keys", "create", "--principal", "mallory", cwd=project)
    assert proc.returncode == 2
    assert errors(proc) == ["error: unknown principal 'mallory': add [principals.mallory] to agentkeel.toml"]
    assert proc.stdout == "" and listed(project) == []


@pytest.mark.parametrize("moment", ["2020-01-01", "2001-09-09T01:46:40", "1000000000"])
def test_an_expiry_in_the_past_is_refused(project: Path, moment: str) -> None:
    proc = agentkeel("keys", "create", "--principal", "alice", "--expires", moment, cwd=project)
    assert proc.returncode == 2
    [line] = errors(proc)
    assert "--expires" in line and "in the past" in line
    assert proc.stdout == "" and listed(project) == []


@pytest.mark.parametrize(("args", "named"), [
    (("--expires", "next tuesday"), "--expires"),
    (("--rate-limit", "0"), "--rate-limit"),
    (("--rate-limit", "-1"), "--rate-limit"),
    (("--rate-limit", "nan"), "--rate-limit"),
    (("--rate-limit", "inf"), "--rate-limit"),
    (("--rate-limit", "fast"), "--rate-limit"),
    (("--name", "x" * 201), "--name"),
    (("--principal", ""), "--principal"),
])
def test_bad_options_are_usage_errors_naming_the_option(project: Path, args: tuple[str, ...], named: str) -> None:
    base = ["--principal", "alice"] if args[0] != "--principal" else []
    proc = agentkeel("keys", "create", *base, *args, cwd=project)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = errors(proc)
    assert line.startswith("error: ") and named in line, line
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_future_expiry_is_kept_and_shown(project: Path) -> None:
    _, key_id = create(project, "--principal", "alice", "--expires", str(int(time.time()) + 3600))
    [row] = listed(project)
    assert row["key_id"] == key_id and row["expires_at"] == pytest.approx(time.time() + 3600, abs=120)


def test_create_and_revoke_are_audited_without_the_secret(project: Path) -> None:
    secret, key_id = create(project, "--principal", "bob", "--name", "deploy", "--rate-limit", "4")
    agentkeel("keys", "list", cwd=project)  # reading is not audited
    proc = agentkeel("keys", "revoke", key_id, cwd=project)
    assert proc.returncode == 0, proc.stderr
    records = audit_records()
    assert [(r["action"], r["principal"], r["decision"], r["run_id"], r["tool"]) for r in records] == [
        ("key_create", "bob", "allow", "", ""),
        ("key_revoke", "bob", "allow", "", ""),
    ]
    assert records[0]["reason"] == f"key {key_id} created (name 'deploy', rate limit 4/s)"
    assert records[1]["reason"] == f"key {key_id} revoked"
    text = (home() / "audit.jsonl").read_text()
    assert secret[16:] not in text
    verify = agentkeel("audit", "verify", str(home() / "audit.jsonl"), cwd=project)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "matches its anchor, 2 record(s)" in verify.stdout  # flushed: the anchor is up to date


def test_keys_appears_in_the_help(project: Path) -> None:
    proc = agentkeel("--help", cwd=project)
    assert proc.returncode == 0 and re.search(r"^\s+keys\s", proc.stdout, re.MULTILINE), proc.stdout
    sub = agentkeel("keys", "--help", cwd=project)
    assert sub.returncode == 0 and {"create", "list", "revoke"} <= set(sub.stdout.split())
