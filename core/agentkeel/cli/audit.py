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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(path: Path | None, config_path: Path | None, as_json: bool) -> None:
    """Check the hash chain of the audit log at PATH (default: <home>/audit.jsonl).

    Exits 0 when every line is intact, 1 naming the first bad line otherwise.
    """
    if path is None:
        try:
            path = default_path(Config.load(config_path))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from exc
    result = verify(path)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(path),
                    "ok": result.ok,
                    "records": result.records,
                    "problem": result.problem,
                    "line": result.line,
                    "last_hash": result.last_hash,
                }
            )
        )
    elif result.ok:
        head = f", last hash {result.last_hash}" if result.last_hash else ""
        click.echo(f"{path}: chain intact, {result.records} record(s){head}")
    else:
        where = f"line {result.line}: " if result.line is not None else ""
        click.echo(
            f"{path}: {where}{result.problem} ({result.records} intact record(s) before it)",
            err=True,
        )
    if not result.ok:
        sys.exit(1)  # not ctx.exit(1): a non-standalone caller would get it as a return value
