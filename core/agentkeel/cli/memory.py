"""``agentkeel memory show|forget``: what memory keeps of a user, and deleting it.

``forget`` deletes turns, summaries, records (and their full-text index entries and embeddings)
and, unless ``--session`` is given, profile facts; ``--before`` only rows older
than a date. The deletion is written to the audit log (action ``memory_forget``);
``--vacuum`` gives the space back to the file system afterwards.
"""

from __future__ import annotations

from typing import Any

import click

from agentkeel.cli.common import (
    build_system,
    check_text,
    config_option,
    echo_json,
    json_option,
    load_config,
    printable,
    when,
)
from agentkeel.cli.costs import parse_moment
from agentkeel.errors import StoreError
from agentkeel.memory.assemble import MemorySettings
from agentkeel.memory.sqlite import open_store
from agentkeel.memory.store import MemoryStore, Summary


@click.group()
def memory() -> None:
    """Inspect and delete what memory keeps of a user."""


def _open(config_path: str | None) -> tuple[Any, MemoryStore]:
    config = load_config(config_path)
    try:
        return config, open_store(config, MemorySettings.from_config(config))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from exc


def _summary_text(summary: Summary | None) -> str | None:
    return summary.text if summary is not None else None


@memory.command("show")
@click.option("--user", "user_id", required=True, callback=check_text, help="Whose memory to show.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Records to list.")
@config_option
@json_option
def show(user_id: str, limit: int, config_path: str | None, as_json: bool) -> None:
    """The user's profile, sessions (turns, summary) and most recent memory records."""
    _config, store = _open(config_path)
    try:
        profile = store.profile(user_id)
        sessions = store.sessions(user_id)
        records = store.records(user_id, limit=limit)
        summaries = {s.session_id: store.summary(user_id, s.session_id) for s in sessions}
    finally:
        store.close()
    if as_json:
        echo_json({
            "user": user_id,
            "profile": [{"key": f.key, "value": f.value, "run_id": f.run_id, "ts": f.ts} for f in profile],
            "sessions": [{"session": s.session_id, "turns": s.turns, "first_ts": s.first_ts, "last_ts": s.last_ts,
                          "summary": _summary_text(summaries.get(s.session_id))}
                         for s in sessions],
            "records": [{"id": r.id, "session": r.session_id, "run_id": r.run_id, "ts": r.ts, "text": r.text}
                        for r in records],
        })
        return
    if not (profile or sessions or records):
        click.echo(f"nothing is kept of user {printable(user_id)}")
        return
    click.echo(f"profile ({len(profile)}):")
    for f in profile:
        click.echo(f"  {printable(f.key)} = {printable(f.value)}  (run {f.run_id}, {when(f.ts)})")
    click.echo(f"sessions ({len(sessions)}):")
    for s in sessions:
        summary = summaries[s.session_id]
        note = f", summary of turns up to #{summary.upto_turn_id}" if summary else ""
        click.echo(f"  {printable(s.session_id)}: {s.turns} turns, last {when(s.last_ts)}{note}")
    click.echo(f"records (newest {len(records)}):")
    for r in records:
        first = printable(" ".join(r.text.split()))[:100]
        click.echo(f"  #{r.id} {when(r.ts)} [{printable(r.session_id)}] {first}")


@memory.command("forget")
@click.option("--user", "user_id", required=True, callback=check_text, help="Whose memory to delete.")
@click.option("--session", "session_id", default=None, callback=check_text, help="Only this session.")
@click.option("--before", default=None, help="Only rows older than this date or time (in [budget] timezone).")
@click.option("--vacuum", is_flag=True, help="Give the freed space back to the file system (VACUUM).")
@config_option
@json_option
def forget(user_id: str, session_id: str | None, before: str | None, vacuum: bool, config_path: str | None,
           as_json: bool) -> None:
    """Delete what memory keeps of a user (right to be forgotten), and audit it."""
    config, store = _open(config_path)
    cutoff = parse_moment(before, config.timezone, "--before") if before else None
    try:
        gone = store.forget(user_id, session_id=session_id, before=cutoff)
        if vacuum:
            store.vacuum()
    finally:
        store.close()
    scope = (f"session {session_id!r}" if session_id else "all") + (f", before {before}" if before else "")
    system = build_system(config)
    try:
        system.stores.audit.record(
            run_id="", principal=user_id, action="memory_forget", tool="", decision="allow",
            reason=f"{scope}: {gone.turns} turns, {gone.records} records, {gone.embeddings} embeddings, "
                   f"{gone.summaries} summaries, {gone.profile} profile facts", arg_keys=(),
        )
    finally:
        system.close()
    if as_json:
        echo_json({"user": user_id, "session": session_id, "before": cutoff, "turns": gone.turns,
                   "records": gone.records, "embeddings": gone.embeddings, "summaries": gone.summaries,
                   "profile": gone.profile})
        return
    click.echo(f"forgot {gone.turns} turns, {gone.records} records, {gone.embeddings} embeddings, "
               f"{gone.summaries} summaries and {gone.profile} profile facts of user {printable(user_id)} "
               f"({printable(scope)})")
