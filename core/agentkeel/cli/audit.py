"""``agentkeel audit``: inspect the hash-chained audit log.

Attached to the main CLI with ``cli.add_command(audit)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from agentkeel.config import Config
from agentkeel.errors import ConfigError
from agentkeel.permissions.audit import default_path, verify


@click.group()
def audit() -> None:
    """Inspect the append-only, hash-chained audit log."""


@audit.command("verify")
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="agentkeel.toml whose home holds audit.jsonl (when PATH is not given).",
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(
    path: Path | None, config_path: Path | None, home: Path | None, require_anchor: bool, as_json: bool
) -> None:
    """Check the audit log at PATH (default: <home>/audit.jsonl) byte for byte and
    against the head and record count anchored in <home>/agentkeel.db.

    Exits 0 when every line is intact and matches the anchor (or there is no
    anchor, which the output says; --require-anchor makes that exit 1), and 1
    naming the first bad line or the mismatch otherwise.
    """
    if path is None:
        try:
            config = Config.load(config_path)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
        path = default_path(config)
        if home is None:
            home = Path(config.home)
    result = verify(path, home=home)
    failed = not result.ok or (require_anchor and not result.anchored)
    if as_json:
        click.echo(
            json.dumps(
                {
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
            )
        )
    elif result.ok:
        head = f", last hash {result.last_hash}" if result.last_hash else ""
        legacy = (
            f"; {result.legacy_records} of them in the old format 1 (written before the format "
            "version field), checked byte for byte like the rest"
            if result.legacy_records
            else ""
        )
        if result.anchored:
            click.echo(
                f"{path}: chain intact and matches its anchor, {result.records} record(s){head}{legacy}"
            )
        else:
            click.echo(
                f"{path}: chain intact, {result.records} record(s){head}{legacy}; "
                f"NOT anchored ({(result.note or '').removeprefix('not anchored: ')}): records cut "
                "from the end, an emptied file or a fully re-chained replacement would not be detected",
                err=failed,
            )
    else:
        where = f"line {result.line}: " if result.line is not None else ""
        if result.line is not None and result.records < result.line:
            counted = f" ({result.records} intact record(s) before it)"
        elif result.records:  # the lines chain correctly; the file does not match its anchor
            counted = f" (the file's {result.records} record(s) chain correctly among themselves)"
        else:
            counted = ""
        click.echo(f"{path}: {where}{result.problem}{counted}", err=True)
    if failed:
        sys.exit(1)  # not ctx.exit(1): a non-standalone caller would get it as a return value
