"""``agentkeel runs``, ``show``, ``resume`` and ``rollback``: durable runs from the journal.

``show``, ``resume`` and ``rollback`` print the answer first, like ``run``;
``show`` lists every revision of the run's plan with its steps, so a replan
(or a round of an adaptive plan) is visible.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from agentkeel.cli.common import (
    build_system,
    check_text,
    config_option,
    echo_json,
    emit_response,
    exit_code,
    json_option,
    load_config,
    print_response,
    when,
)
from agentkeel.cli.progress import follow_and_finish
from agentkeel.types import AgentResponse, RunStatus

run_id_argument = click.argument("run_id", callback=check_text)


@click.command()
@config_option
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
def runs(config_path: str | None, limit: int, as_json: bool) -> None:
    """List runs, newest first, with their state (unfinished ones included)."""
    system = build_system(load_config(config_path))
    records = system.runs(limit)
    spent = system.budgets.run_costs([r.run_id for r in records])
    if as_json:
        echo_json([
            {"run_id": r.run_id, "status": r.status, "user_id": r.user_id, "session_id": r.session_id,
             "message": r.message, "detail": r.detail, "created_at": r.created_at, "updated_at": r.updated_at,
             "cost_usd": spent.get(r.run_id, 0.0)}
            for r in records
        ])
        return
    for r in records:
        click.echo(f"{r.run_id}  {when(r.created_at)}  {r.status:<16} ${spent.get(r.run_id, 0.0):<9.6f} "
                   f"{r.user_id:<12} {r.message[:60]}")


@click.command()
@run_id_argument
@config_option
@json_option
def show(run_id: str, config_path: str | None, as_json: bool) -> None:
    """Show a run as the journal recorded it.

    Its answer, who asked what in which session, every plan revision (number,
    reason, planner) with its steps, and the cost (its duration as the journal
    gives it). --json adds "request" (user_id, session_id, message) to the response."""
    system = build_system(load_config(config_path))
    response = system.show(run_id)
    record = system.journal.load(run_id).run
    request: dict[str, Any] = {"user_id": record.user_id, "session_id": record.session_id,
                               "message": record.message}
    if as_json:
        echo_json({**response.to_dict(), "request": request})
        return
    if response.answer.strip():
        click.echo(response.answer.rstrip("\n"))
    click.echo(f"request by {record.user_id} in session {record.session_id} at {when(record.created_at)}: "
               f"{record.message}")
    print_response(response, answer=False, revisions=True)


def _resolutions(values: tuple[str, ...]) -> dict[int, bool]:
    out = {}
    for value in values:
        step, _, verdict = value.partition("=")
        if not step.isdigit() or verdict not in ("done", "not-done"):
            raise click.BadParameter(f"{value!r}: expected STEP=done or STEP=not-done", param_hint="--resolve")
        out[int(step)] = verdict == "done"
    return out


@click.command()
@run_id_argument
@click.option("--resolve", "resolve", multiple=True, metavar="STEP=done|not-done",
              help="Settle an in-doubt step: its effect happened (done) or did not (not-done: run it again).")
@config_option
@json_option
def resume(run_id: str, resolve: tuple[str, ...], config_path: str | None, as_json: bool) -> None:
    """Continue an unfinished run from its journal.

    A crashed run, one waiting for an approval (decided with `agentkeel approve`
    or `deny`), one in doubt (settled with --resolve).

    Completed steps are not run again. Prints the answer, then the run, like
    `run`, with progress on stderr; exits with the run's code (see `run --help`).
    """
    resolutions = _resolutions(resolve)
    with build_system(load_config(config_path)) as system:
        follow_and_finish(lambda on_event: system.resume_sync(run_id, resolutions, on_event=on_event), as_json)


@click.command()
@run_id_argument
@config_option
@json_option
def rollback(run_id: str, config_path: str | None, as_json: bool) -> None:
    """Compensate the completed steps of a run, last first.

    Prints the run as it stands afterwards, with what the rollback did. Exits 0
    when the run is rolled back, otherwise with the code of the run's status.
    """
    system = build_system(load_config(config_path))

    async def main() -> AgentResponse:
        async with system:
            return await system.rollback(run_id)

    response = asyncio.run(main())
    emit_response(response, as_json, always_message=True)
    sys.exit(0 if response.status is RunStatus.ROLLED_BACK else exit_code(response))
