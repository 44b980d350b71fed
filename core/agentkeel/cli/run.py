"""``agentkeel run``: serve one request.

The answer comes first on stdout, then the run line, the steps and the cost;
live progress goes to stderr while the run runs (``agentkeel.cli.progress``).
"""

from __future__ import annotations

import click

from agentkeel.cli.common import (
    build_system,
    check_budget,
    check_message,
    check_text,
    config_option,
    json_option,
    load_config,
)
from agentkeel.cli.progress import follow_and_finish
from agentkeel.types import AgentRequest


@click.command()
@click.argument("message", callback=check_message)
@click.option("--user", "user_id", default=None, callback=check_text,
              help="The principal making the request (required, except with --server: the key's principal).")
@click.option("--session", "session_id", default="default", show_default=True, callback=check_text)
@click.option("--budget", "budget_usd", type=float, default=None, callback=check_budget,
              help="Budget in USD for this request (a finite amount >= 0).")
@click.option("--server", default=None, metavar="URL",
              help="Submit to an `agentkeel serve` at URL (key from $AGENTKEEL_API_KEY; its principal is the user).")
@config_option
@json_option
def run(message: str, user_id: str | None, session_id: str, budget_usd: float | None, server: str | None,
        config_path: str | None, as_json: bool) -> None:
    """Serve one request MESSAGE on behalf of --user (MESSAGE '-' reads it from stdin).

    Prints the answer, then the run and its steps, then the cost; --json prints
    the whole response (its "answer" included) and nothing else. Progress goes to
    stderr while the run runs: one line per step updated in place on a terminal,
    plain "step N TOOL: started" / "...: succeeded in 0.07s" lines otherwise.

    \b
    Exit codes: 0 succeeded, 1 a step failed, 2 usage or configuration error,
    3 permission denied, 4 budget exhausted, 5 plan rejected, 6 in doubt,
    7 waiting for approval, 10 degraded (answered without an optional step
    whose tool was unavailable), 11 cancelled.

    With --server URL the request is served by that server (`agentkeel serve`),
    as the principal of the API key in $AGENTKEEL_API_KEY, with the same output.
    """
    if server is not None:
        from agentkeel.cli.remote import run_remote

        if not server.startswith(("http://", "https://")):
            raise click.BadParameter(f"{server!r} is not an http:// or https:// URL", param_hint="--server")
        payload: dict[str, object] = {"message": message, "session_id": session_id}
        if budget_usd is not None:
            payload["budget_usd"] = budget_usd
        follow_and_finish(lambda on_event: run_remote(server, payload, on_event), as_json)
    if user_id is None:
        raise click.UsageError("Missing option '--user'.")
    try:
        request = AgentRequest(message=message, user_id=user_id, session_id=session_id, budget_usd=budget_usd)
    except ValueError as exc:  # the arguments were checked above; this is the request's own last word
        raise click.UsageError(str(exc)) from exc
    with build_system(load_config(config_path)) as system:  # closed once the response is printed
        follow_and_finish(lambda on_event: system.run_sync(request, on_event=on_event), as_json)
