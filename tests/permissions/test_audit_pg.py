"""The audit log across replicas: each replica appends to its own hash-chained file, and the
anchor of every chain is checkpointed in PostgreSQL (``audit_heads``), outside the replica.
Truncating a log, or replacing it together with the local agentkeel.db, is detected there."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from agentkeel.cli.audit import audit
from agentkeel.config import Config
from agentkeel.permissions import audit_pg
from agentkeel.permissions.audit import GENESIS, AuditLog, canonical, verify
from agentkeel.permissions.audit_pg import PostgresAnchor, chain_id
from agentkeel.stores import db_path
from click.testing import CliRunner, Result


def write(log: AuditLog, n: int, *, tag: str = "r") -> None:
    for i in range(n):
        log.record(run_id=f"{tag}{i}", principal="alice", action="tool_call", tool="refund",
                   decision="allow", reason="granted", arg_keys=("order_id",))


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def replica(home: Path, url: str) -> AuditLog:
    """What ``Stores.audit`` opens on a replica with ``[store] url``."""
    path = home / "audit.jsonl"
    return AuditLog(path, extra_anchor=PostgresAnchor(url, path))


def heads(url: str) -> dict[str, tuple[int, str, str | None]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT chain_id, count, head, broken FROM audit_heads").fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def forged_chain(n: int, *, decision: str = "deny") -> bytes:
    """A freshly chained log of ``n`` records: what a forger with write access to the home writes."""
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        row: dict[str, Any] = {"action": "tool_call", "arg_keys": ["order_id"], "decision": decision,
                               "principal": "alice", "reason": "forged", "run_id": f"f{seq}",
                               "tool": "refund", "ts": 1712345678.5 + seq, "seq": seq, "prev": prev, "v": 2}
        body = canonical(row)
        prev = hashlib.sha256(body).hexdigest()
        out.append(body[:-1] + b',"hash":"' + prev.encode() + b'"}\n')
    return b"".join(out)


def pg_verify(path: Path, url: str) -> Any:
    return verify(path, anchor_store=PostgresAnchor(url, path))


def cli(*args: str) -> Result:
    return CliRunner().invoke(audit, ["verify", *args])


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Path], Path]:
    """An agentkeel.toml with ``[store] url`` whose home is ``home`` (AGENTKEEL_HOME)."""

    def make(url: str, home: Path) -> Path:
        monkeypatch.setenv("AGENTKEEL_HOME", str(home))
        file = tmp_path / "agentkeel.toml"
        file.write_text(f'[store]\nurl = "{url}"\n')
        return file

    return make


def test_three_replicas_appending_at_once_each_anchor_their_chain(tmp_path: Path, pg_url: str) -> None:
    homes = [tmp_path / f"replica{i}" for i in range(3)]
    logs = [replica(home, pg_url) for home in homes]
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def append(log: AuditLog, tag: str) -> None:
        try:
            start.wait()
            for _ in range(4):
                write(log, 50, tag=tag)
                log.flush()  # the end of a request
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=append, args=(log, f"t{i}-")) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.close()
    assert errors == []
    held = heads(pg_url)
    assert set(held) == {chain_id(home / "audit.jsonl") for home in homes}
    for home in homes:
        path = home / "audit.jsonl"
        result = pg_verify(path, pg_url)
        assert result.ok and result.anchored, result
        assert result.records == 200 and held[chain_id(path)] == (200, result.last_hash, None)
        assert verify(path).anchored  # the local SQLite anchor is written as before


def test_truncating_a_tail_is_detected_by_the_postgres_anchor(tmp_path: Path, pg_url: str) -> None:
    home = tmp_path / "replica"
    with replica(home, pg_url) as log:
        write(log, 5)
    path = home / "audit.jsonl"
    path.write_bytes(b"".join(lines(path)[:3]))
    db_path(home).unlink()  # the local anchor is gone too
    result = pg_verify(path, pg_url)
    assert not result.ok
    assert "has 3 record(s) but its anchor records 5" in (result.problem or "")


def test_replacing_the_file_and_the_local_database_is_detected(
    tmp_path: Path, pg_url: str, config_file: Callable[[str, Path], Path]
) -> None:
    home = tmp_path / "replica"
    path = home / "audit.jsonl"
    with replica(home, pg_url) as log:
        write(log, 5)
    path.write_bytes(forged_chain(5))  # a valid chain of its own, as long as the real one
    db_path(home).unlink()
    local = verify(path)
    assert local.ok and not local.anchored  # the local anchor alone can no longer tell
    result = pg_verify(path, pg_url)
    assert not result.ok and "replaced by another chain" in (result.problem or "")

    bad = cli("--config", str(config_file(pg_url, home)))
    assert bad.exit_code == 1 and "replaced by another chain" in bad.output

    # A writer opening the forgery (a longer one, even) records the break in PostgreSQL, and
    # its later anchoring of the new chain does not hide it.
    path.write_bytes(forged_chain(8))
    assert not db_path(home).exists()  # verify against PostgreSQL created nothing locally
    with replica(home, pg_url) as log:
        write(log, 2)
    count, _, broken = heads(pg_url)[chain_id(path)]
    assert count == 10 and broken is not None and "where its anchor had 5" in broken
    again = pg_verify(path, pg_url)
    assert not again.ok and "the chain was broken before" in (again.problem or "")


def test_a_deleted_log_is_detected(tmp_path: Path, pg_url: str) -> None:
    home = tmp_path / "replica"
    with replica(home, pg_url) as log:
        write(log, 3)
    (home / "audit.jsonl").unlink()
    db_path(home).unlink()
    result = pg_verify(home / "audit.jsonl", pg_url)
    assert not result.ok and "missing, but its anchor records 3" in (result.problem or "")


def test_anchoring_stays_off_the_per_record_path(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"save": 0, "load": 0}
    for name in calls:
        original = getattr(PostgresAnchor, name)

        def counted(self: PostgresAnchor, *args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(PostgresAnchor, name, counted)
    home = tmp_path / "replica"
    # Two writers on one file (two systems on one home): each appends after the other.
    first, second = replica(home, pg_url), replica(home, pg_url)
    for _ in range(100):
        write(first, 1)
        write(second, 1)
    first.flush()
    second.flush()
    # One read each when opening, one when a writer that knew the file empty finds records in
    # it (nothing of its own to check them against); none per record after that.
    assert calls["load"] == 3
    assert calls["save"] <= 8  # at most one per ANCHOR_INTERVAL_S while appending, plus the flushes
    first.close()
    second.close()
    result = pg_verify(home / "audit.jsonl", pg_url)
    assert result.ok and result.anchored and result.records == 200


def test_a_run_through_agent_system_anchors_its_chain_in_postgres(
    tmp_path: Path, pg_url: str, config_file: Callable[[str, Path], Path]
) -> None:
    pytest.importorskip("agentkeel_support")
    from agentkeel.runtime.system import AgentSystem
    from agentkeel.types import AgentRequest

    home = tmp_path / "replica"
    conf = str(config_file(pg_url, home))  # AGENTKEEL_HOME is the replica's home
    config: dict[str, Any] = {"store": {"url": pg_url},
                              "principals": {"demo": {"permissions": ["read", "refunds"]}}}
    with AgentSystem(Config.from_dict(config)) as system:
        response = system.run_sync(AgentRequest(message="where is order 1003", user_id="demo"))
        assert response.ok, response
    path = home / "audit.jsonl"
    records = len(lines(path))
    assert records >= 1
    assert heads(pg_url)[chain_id(path)][0] == records

    ok = cli("--config", conf)
    assert ok.exit_code == 0, ok.output
    assert f"chain intact and matches its anchor, {records} record(s)" in ok.output
    assert "anchored in PostgreSQL at" in ok.output and "audit_heads" in ok.output
    as_json = json.loads(cli("--config", conf, "--json").output)
    assert as_json["ok"] and as_json["anchored"] and as_json["chain_id"] == chain_id(path)


def test_verify_all_lists_every_chain(
    tmp_path: Path, pg_url: str, config_file: Callable[[str, Path], Path]
) -> None:
    homes = [tmp_path / f"replica{i}" for i in range(2)]
    for home in homes:
        with replica(home, pg_url) as log:
            write(log, 4)
    # A replica on another host: anchored, its file out of reach.
    elsewhere = PostgresAnchor(pg_url, "/srv/agentkeel/audit.jsonl", chain="other-host:/srv/agentkeel/audit.jsonl")
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO audit_heads (chain_id, host, log_path, count, head, size, updated_at) "
                     "VALUES (%s, 'other-host', '/srv/agentkeel/audit.jsonl', 7, %s, 900, 1712345678.5)",
                     (elsewhere.chain, "ab" * 32))
    conf = str(config_file(pg_url, homes[0]))
    result = cli("--config", conf, "--all")
    assert result.exit_code == 0, result.output
    out = result.output.splitlines()
    assert len(out) == 3
    for home in homes:
        assert any(line.startswith(f"{chain_id(home / 'audit.jsonl')}: chain intact and matches its anchor, "
                                   "4 record(s)") for line in out)
    assert any(line.startswith("other-host:/srv/agentkeel/audit.jsonl: anchored only, not verified here "
                               "(7 record(s) anchored") for line in out)

    chains = json.loads(cli("--config", conf, "--all", "--json").output)["chains"]
    assert sorted(c["state"] for c in chains) == ["anchored", "verified", "verified"]

    cut = homes[1] / "audit.jsonl"
    cut.write_bytes(b"".join(lines(cut)[:2]))
    bad = cli("--config", conf, "--all")
    assert bad.exit_code == 1
    assert f"{chain_id(cut)}: the log has 2 record(s) but its anchor records 4" in bad.output


def test_verify_all_needs_a_store_url(tmp_path: Path) -> None:
    file = tmp_path / "agentkeel.toml"
    file.write_text(f'home = "{tmp_path / "home"}"\n')
    result = cli("--config", str(file), "--all")
    assert result.exit_code != 0 and "set [store] url" in result.output


def test_an_unreachable_server_fails_verify_without_the_password(tmp_path: Path) -> None:
    from agentkeel.testing.services import free_port

    url = f"postgresql://agentkeel:s3cret@127.0.0.1:{free_port()}/nowhere"
    home = tmp_path / "replica"
    with AuditLog(home / "audit.jsonl") as log:
        write(log, 1)
    result = pg_verify(home / "audit.jsonl", url)
    assert not result.ok and "127.0.0.1" in (result.problem or "") and "s3cret" not in (result.problem or "")
    assert audit_pg.TABLE == "audit_heads"
