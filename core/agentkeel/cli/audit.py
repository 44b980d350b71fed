"""``agentkeel audit``: inspect the hash-chained audit log.

Attached to the main CLI with ``cli.add_command(audit)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agentkeel.config import Config
from agentkeel.errors import ConfigError, StoreError
from agentkeel.permissions.audit import VerifyResult, default_path, verify

if TYPE_CHECKING:
    from agentkeel.permissions.audit_pg import HeadRow


@click.group()
def audit() -> None:
    """Inspect the append-only, hash-chained audit log."""


@audit.command("verify")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agentkeel.toml whose home holds audit.jsonl (when PATH is not given) and whose "
    "[store] url holds the anchors in PostgreSQL.",
)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory whose agentkeel.db holds the log's anchor (default: the log's directory).",
)
@click.option(
    "--require-anchor",
    is_flag=True,
    help="Fail (exit 1) when the log has no anchor, instead of only saying so.",
)
@click.option(
    "--all",
    "all_chains",
    is_flag=True,
    help="With [store] url: list every chain anchored in PostgreSQL, verifying those whose "
    "log is on this machine.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(
    path: Path | None, config_path: Path | None, home: Path | None, require_anchor: bool,
    all_chains: bool, as_json: bool,
) -> None:
    """Check the audit log at PATH (default: <home>/audit.jsonl) byte for byte and
    against the head and record count anchored in <home>/agentkeel.db, or, when the
    configuration sets [store] url, in PostgreSQL (table audit_heads, the chain
    <host>:<absolute path of the log>). PATH alone (without --config) uses agentkeel.db.

    Exits 0 when every line is intact and matches the anchor (or there is no
    anchor, which the output says; --require-anchor makes that exit 1), and 1
    naming the first bad line or the mismatch otherwise. --all lists every chain
    anchored in PostgreSQL and exits 1 when one it verified failed or one is
    recorded as broken.
    """
    url: str | None = None
    if path is None or config_path is not None or all_chains:
        from agentkeel.pg import store_url

        try:
            config = Config.load(config_path)
            url = store_url(config)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        if path is None:
            path = default_path(config)
            if home is None and url is None:
                home = Path(config.home)
    if all_chains:
        if url is None:
            raise click.ClickException("--all lists the chains anchored in PostgreSQL: set [store] url")
        sys.exit(_verify_all(url, require_anchor, as_json))
    where: str | None = None
    chain: str | None = None
    if url is None:
        result = verify(path, home=home)
    else:
        from agentkeel.permissions.audit_pg import PostgresAnchor

        store = PostgresAnchor(url, path)
        where, chain = store.where, store.chain
        result = verify(path, anchor_store=store)
    failed = not result.ok or (require_anchor and not result.anchored)
    if as_json:
        data = _as_dict(path, result, failed)
        if url is not None:
            data.update(anchor_store=where, chain_id=chain)
        click.echo(json.dumps(data))
    else:
        text, err = _describe(str(path), result, failed)
        if url is not None and result.anchored:
            text += f" (anchored in {where})"
        click.echo(text, err=err)
    if failed:
        sys.exit(1)  # not ctx.exit(1): a non-standalone caller would get it as a return value


def _as_dict(path: Path | str, result: VerifyResult, failed: bool) -> dict[str, Any]:
    return {
        "path": str(path),
        "ok": result.ok and not failed,
        "records": result.records,
        "problem": result.problem,
        "line": result.line,
        "last_hash": result.last_hash,
        "anchored": result.anchored,
        "anchor_count": result.anchor_count,
        "anchor_head": result.anchor_head,
        "note": result.note,
        "legacy_records": result.legacy_records,
    }


def _describe(label: str, result: VerifyResult, failed: bool) -> tuple[str, bool]:
    """The line ``verify`` prints for one log, and whether it goes to stderr."""
    if result.ok:
        head = f", last hash {result.last_hash}" if result.last_hash else ""
        legacy = (
            f"; {result.legacy_records} of them in the old format 1 (written before the format "
            "version field), checked byte for byte like the rest"
            if result.legacy_records
            else ""
        )
        if result.anchored:
            return f"{label}: chain intact and matches its anchor, {result.records} record(s){head}{legacy}", False
        return (
            f"{label}: chain intact, {result.records} record(s){head}{legacy}; "
            f"NOT anchored ({(result.note or '').removeprefix('not anchored: ')}): records cut "
            "from the end, an emptied file or a fully re-chained replacement would not be detected",
            failed,
        )
    where = f"line {result.line}: " if result.line is not None else ""
    if result.line is not None and result.records < result.line:
        counted = f" ({result.records} intact record(s) before it)"
    elif result.records:  # the lines chain correctly; the file does not match its anchor
        counted = f" (the file's {result.records} record(s) chain correctly among themselves)"
    else:
        counted = ""
    return f"{label}: {where}{result.problem}{counted}", True


def _verify_all(url: str, require_anchor: bool, as_json: bool) -> int:
    """``verify --all``: every chain in ``audit_heads``; the exit code."""
    from agentkeel.permissions.audit_pg import PostgresAnchor, host_name, list_heads

    try:
        rows = list_heads(url)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc
    here = host_name()
    ours = {row.log_path for row in rows if row.host == here}
    status = 0
    out: list[dict[str, Any]] = []

    def reachable(row: HeadRow) -> bool:
        # This host's logs, and another host's only on a path this host does not use itself
        # (a shared volume): every container may have its own /data/audit.jsonl.
        return row.host == here or (row.log_path not in ours and Path(row.log_path).is_file())

    for row in rows:
        summary = (f"{row.count} record(s) anchored, head {row.head}, "
                   f"updated {_when(row.updated_at)}, host {row.host}, log {row.log_path}")
        if reachable(row):
            result = verify(row.log_path, anchor_store=PostgresAnchor(url, row.log_path, chain=row.chain_id))
            failed = not result.ok
            status |= failed
            entry = {**_as_dict(row.log_path, result, failed), "state": "failed" if failed else "verified"}
            text, err = _describe(row.chain_id, result, failed)
        elif row.broken:
            status = 1
            entry = {"state": "broken", "problem": f"the chain was broken before: {row.broken}"}
            text, err = f"{row.chain_id}: BROKEN ({summary}): {row.broken}", True
        else:
            entry = {"state": "anchored"}
            text, err = f"{row.chain_id}: anchored only, not verified here ({summary})", False
        entry.update(chain_id=row.chain_id, host=row.host, log_path=row.log_path, count=row.count,
                     head=row.head, size=row.size, updated_at=row.updated_at, broken=row.broken)
        out.append(entry)
        if not as_json:
            click.echo(text, err=err)
    if not rows:
        status = int(require_anchor)
        if not as_json:
            click.echo("no audit chain is anchored in PostgreSQL", err=require_anchor)
    if as_json:
        click.echo(json.dumps({"ok": status == 0, "chains": out}))
    return status


def _when(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(ts))
