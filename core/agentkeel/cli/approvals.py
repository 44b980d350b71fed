"""``agentkeel approvals``, ``approve`` and ``deny``: a human's yes or no before a step runs.

A run whose step needs approval stops ``waiting`` (exit code 7). ``approvals``
lists what waits; ``approve RUN STEP`` / ``deny RUN STEP`` record the decision
(``AgentSystem.decide``) on behalf of ``--as``, else ``$AGENTKEEL_USER``, else
the login name; ``resume RUN`` (or ``--resume``) then runs the step, or aborts
the run and compensates what took effect. A decision the approver may not make
(not a principal, no ``approve`` permission, their own request, already
decided, expired, no such approval) is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from typing import Any

import attrs
import click

from agentkeel.cli.common import (
    build_system,
    check_text,
    check_utf8,
    command_line,
    config_option,
    echo_json,
    json_option,
    load_config,
    one_line,
    text_problem,
    when,
)
from agentkeel.cli.progress import follow_and_finish
from agentkeel.journal.base import ApprovalRecord

USER_ENV = "AGENTKEEL_USER"
"""Who approves when ``--as`` is not given (then the login name)."""


def approval_dict(record: ApprovalRecord, now: float) -> dict[str, Any]:
    """The record as JSON, ``status`` as it stands at ``now`` (a pending one past its expiry is expired)."""
    return {**attrs.asdict(record), "args": dict(record.args), "status": record.status_at(now)}


def _args(record: ApprovalRecord) -> str:
    return one_line(json.dumps(dict(record.args), ensure_ascii=False, default=str))


def approval_line(record: ApprovalRecord, now: float) -> str:
    status = record.status_at(now)
    head = (f"{record.run_id}  step {record.step_id:<3} {record.tool_name:<20} {status:<8} {_args(record)}  "
            f"asked by {record.requested_by} at {when(record.requested_at)}")
    if status == "pending":
        return f"{head}, expires {when(record.expires_at)}"
    if status == "expired":
        return f"{head}, expired {when(record.expires_at)}"
    why = f": {one_line(record.reason)}" if record.reason else ""
    return f"{head}, {status} by {record.decided_by} at {when(record.decided_at)}{why}"


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Every approval, decided and expired ones too.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@config_option
@json_option
def approvals(show_all: bool, limit: int, config_path: str | None, as_json: bool) -> None:
    """List pending approvals (--all: every approval).

    Newest first, one a line: run, step, tool, arguments, who asked, since when
    and until when. --all adds the decided and expired ones, with their status
    (pending, approved, denied, expired) and who decided them."""
    system = build_system(load_config(config_path))
    records = system.approvals(None if show_all else "pending", limit)
    now = time.time()
    if as_json:
        echo_json([approval_dict(r, now) for r in records])
        return
    if not records:
        click.echo("no approvals" if show_all else "no pending approvals")
    for r in records:
        click.echo(approval_line(r, now))


def check_step(ctx: click.Context, param: click.Parameter, value: int) -> int:
    """Click callback for STEP: a step number, from 1."""
    if value < 1:
        raise click.BadParameter(f"must be a step number (an integer >= 1), got {value}", ctx=ctx, param=param)
    return value


def check_approver(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """Click callback for ``--as``: the value, else ``$AGENTKEEL_USER``, else the login name."""
    if value is not None:
        checked = check_text(ctx, param, value)
        assert checked is not None
        return checked
    env = os.environ.get(USER_ENV, "")
    if env.strip():
        problem = text_problem(env)
        if problem:
            raise click.BadParameter(f"${USER_ENV} {problem}", ctx=ctx, param=param)
        return env
    try:
        name = getpass.getuser()
    except Exception:  # noqa: BLE001 - OSError or KeyError, by platform and version
        name = ""
    if not name.strip() or text_problem(name):
        raise click.BadParameter(f"no approver given and the login name is unknown; pass --as USER or set "
                                 f"{USER_ENV}", ctx=ctx, param=param)
    return name


def _decision_command(approved: bool) -> click.Command:
    verb = "approve" if approved else "deny"
    then = ("runs the step" if approved
            else "denies the step: the run aborts and what took effect is compensated")

    @click.command(name=verb, help=f"""{verb.capitalize()} step STEP of run RUN_ID, which waits for approval.

        The approver is --as, else ${USER_ENV}, else the login name; they must be a
        principal holding the "approve" permission and (unless [approvals]
        allow_self = true) not the one who asked. Then `agentkeel resume RUN_ID`
        {then}; --resume does that at once, printing the run's response and
        exiting with its code (see `agentkeel run --help`).""")
    @click.argument("run_id", callback=check_text)
    @click.argument("step_id", metavar="STEP", type=int, callback=check_step)
    @click.option("--as", "approver", default=None, callback=check_approver, metavar="USER",
                  help=f"Who decides (default: ${USER_ENV}, else the login name).")
    @click.option("--reason", default="", callback=check_utf8, help="Why; recorded with the decision.")
    @click.option("--resume", "then_resume", is_flag=True, help="Resume the run at once and print its response.")
    @config_option
    @json_option
    def decide(run_id: str, step_id: int, approver: str, reason: str, then_resume: bool, config_path: str | None,
               as_json: bool) -> None:
        system = build_system(load_config(config_path))
        record = system.decide(run_id, step_id, approver=approver, approved=approved, reason=reason)
        resume = command_line("resume", run_id, config_path=config_path)
        if not then_resume:
            if as_json:
                echo_json({**approval_dict(record, time.time()), "next": resume})
                return
            click.echo(decision_line(record))
            after = "" if approved else " (the run then aborts and compensates what took effect)"
            click.echo(f"next: {resume}{after}")
            return
        if not as_json:
            click.echo(decision_line(record))
        with system:
            follow_and_finish(lambda on_event: system.resume_sync(run_id, on_event=on_event), as_json)

    return decide


def decision_line(record: ApprovalRecord) -> str:
    why = f": {one_line(record.reason)}" if record.reason else ""
    return (f"{record.status} step {record.step_id} ({record.tool_name} {_args(record)}) of run {record.run_id} "
            f"as {record.decided_by}{why}")


approve = _decision_command(approved=True)
deny = _decision_command(approved=False)
