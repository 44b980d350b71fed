"""``agentkeel runs``, ``show``, ``resume`` and ``rollback``: durable runs from the journal."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime

import click

from agentkeel.cli import EXIT_CODES, build_system, config_option, load_config, print_response
from agentkeel.types import AgentResponse, RunStatus


def _finish(response: AgentResponse, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(response.to_dict(), indent=2, default=str))
    else:
        print_response(response)
    sys.exit(EXIT_CODES[response.status])


@click.command()
@config_option
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs(config_path: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first, with their state (unfinished ones included)."""
    system = build_system(load_config(config_path))
    records = system.runs(limit)
    if as_json:
        click.echo(json.dumps([
            {"run_id": r.run_id, "status": r.status, "user_id": r.user_id, "message": r.message,
             "detail": r.detail, "created_at": r.created_at, "updated_at": r.updated_at}
            for r in records
        ], indent=2))
        return
    for r in records:
        when = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{r.run_id}  {when}  {r.status:<16} {r.user_id:<12} {r.message[:60]}")


@click.command()
@click.argument("run_id")
@config_option
@click.option("--json", "as_json", is_flag=True)
def show(run_id: str, config_path: str | None, as_json: bool) -> None:
    """Show a run as the journal recorded it."""
    system = build_system(load_config(config_path))
    response = system.show(run_id)
    if as_json:
        click.echo(json.dumps(response.to_dict(), indent=2, default=str))
    else:
        print_response(response)


def _resolutions(values: tuple[str, ...]) -> dict[int, bool]:
    out = {}
    for value in values:
        step, _, verdict = value.partition("=")
        if not step.isdigit() or verdict not in ("done", "not-done"):
            raise click.BadParameter(f"{value!r}: expected STEP=done or STEP=not-done", param_hint="--resolve")
        out[int(step)] = verdict == "done"
    return out


@click.command()
@click.argument("run_id")
@click.option("--resolve", "resolve", multiple=True, metavar="STEP=done|not-done",
              help="Settle an in-doubt step: its effect happened (done) or did not (not-done: run it again).")
@config_option
@click.option("--json", "as_json", is_flag=True)
def resume(run_id: str, resolve: tuple[str, ...], config_path: str | None, as_json: bool) -> None:
    """Continue an unfinished run from its journal (never re-plans)."""
    resolutions = _resolutions(resolve)
    system = build_system(load_config(config_path))

    async def main() -> AgentResponse:
        async with system:
            return await system.resume(run_id, resolutions)

    _finish(asyncio.run(main()), as_json)


@click.command()
@click.argument("run_id")
@config_option
@click.option("--json", "as_json", is_flag=True)
def rollback(run_id: str, config_path: str | None, as_json: bool) -> None:
    """Compensate the completed steps of a run, last first."""
    system = build_system(load_config(config_path))

    async def main() -> AgentResponse:
        async with system:
            return await system.rollback(run_id)

    response = asyncio.run(main())
    if response.status is RunStatus.ROLLED_BACK:
        if as_json:
            click.echo(json.dumps(response.to_dict(), indent=2, default=str))
        else:
            print_response(response)
        sys.exit(0)
    _finish(response, as_json)
