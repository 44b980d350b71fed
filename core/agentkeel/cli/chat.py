"""``agentkeel chat``: a conversation, one run per line, on one session.

One ``AgentSystem`` serves the whole chat. Each line read from stdin is a
request of ``--user`` in the session (journaled like any run), printed as its
answer and its steps; progress goes to stderr as for ``run``. Empty lines are
skipped; ``/exit`` or the end of input ends the chat. Without ``--session`` a
new session id is made and printed first, so the chat can be continued later.
A run that fails, and a line that cannot be a request (not UTF-8, say), print
what went wrong and the chat goes on. stdin need not be a terminal: lines can
be piped in.
"""

from __future__ import annotations

import functools
import json
import sys
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from agentkeel.cli.common import (
    build_system,
    check_budget,
    check_text,
    command_line,
    config_option,
    load_config,
    one_line,
    print_response,
    text_problem,
)
from agentkeel.cli.progress import Listener, follow
from agentkeel.errors import AgentkeelError
from agentkeel.types import AgentRequest, AgentResponse

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem

EXIT_COMMAND = "/exit"
PROMPT = "> "

Line = tuple[int, str | None]
"""(line number, its text; None when it is not UTF-8)."""


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def _piped_lines() -> Iterator[Line]:
    stdin = sys.stdin
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # a text-only stream (in-process tests)
        for number, text in enumerate(stdin, start=1):
            yield number, text
        return
    number = 0
    while raw := buffer.readline():  # one line at a time: a writer may wait for each answer
        number += 1
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield number, None


def _typed_lines() -> Iterator[Line]:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass
    number = 0
    while True:
        number += 1
        try:
            text = input(PROMPT)
        except EOFError:
            click.echo(err=True)
            return
        except UnicodeDecodeError:
            yield number, None
            continue
        yield number, text


def new_session_id() -> str:
    return f"chat-{uuid.uuid4().hex[:12]}"


@click.command()
@click.option("--user", "user_id", required=True, callback=check_text, help="The principal making the requests.")
@click.option("--session", "session_id", default=None, callback=check_text,
              help="The session to continue (default: a new one, printed first).")
@click.option("--budget", "budget_usd", type=float, default=None, callback=check_budget,
              help="Budget in USD for each request (a finite amount >= 0).")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print each response as one line of JSON.")
def chat(user_id: str, session_id: str | None, budget_usd: float | None, config_path: str | None,
         as_json: bool) -> None:
    """Chat on one session: one request per line of stdin.

    Each line is a request of --user in the session, journaled like any run.
    Its answer is printed with its run and steps (--json: each response as one
    JSON line); empty lines are skipped and /exit or the end of input ends the
    chat. Without --session a new session id is made and printed first
    (continue it with --session). A failed run, or a line that is not UTF-8,
    prints what went wrong and the chat goes on; the chat exits 0.
    """
    config = load_config(config_path)
    if session_id is None:
        session_id = new_session_id()
        again = command_line("chat", "--user", user_id, "--session", session_id, config_path=config_path)
        click.echo(f"session {session_id} (new; continue it with: {again})", err=as_json)
    else:
        click.echo(f"session {session_id}", err=as_json)
    interactive = _isatty(sys.stdin)
    with build_system(config) as system:
        for number, text in (_typed_lines() if interactive else _piped_lines()):
            message = (text or "").strip()
            if text is not None and not message:
                continue
            if message == EXIT_COMMAND:
                break
            problem = "is not valid UTF-8 text" if text is None or text_problem(message) else None
            if problem is not None:
                click.echo(f"error: line {number} {problem}; skipped", err=True)
                continue
            try:
                request = AgentRequest(message=message, user_id=user_id, session_id=session_id,
                                       budget_usd=budget_usd)
            except ValueError as exc:
                click.echo(f"error: line {number}: {one_line(str(exc))}; skipped", err=True)
                continue
            try:
                response, shown = follow(functools.partial(_serve, system, request), as_json)
            except AgentkeelError as exc:  # e.g. a configuration problem of this request: say it, go on
                click.echo(f"error: line {number}: {one_line(str(exc))}", err=True)
                continue
            if as_json:
                click.echo(json.dumps(response.to_dict(), default=str))
            else:
                print_response(response, answer=not shown)
                click.echo()
            sys.stdout.flush()


def _serve(system: AgentSystem, request: AgentRequest, on_event: Listener | None) -> AgentResponse:
    return system.run_sync(request, on_event=on_event)
