"""The ``agentkeel`` command line: the click group, its commands, and ``main``.

Each command group lives in its own module (``run``, ``chat``, ``inspect``,
``runs``, ``approvals``, ``audit``, ``sandbox``, ``keys``); what they share is in
``agentkeel.cli.common`` (and the live progress of a run in
``agentkeel.cli.progress``), which never import this package, so every module
imports on its own.

Errors print one clean line (``error: ...`` on stderr) and exit 2 for usage and
configuration errors; set ``AGENTKEEL_RAISE_ERRORS=1`` for the traceback.

``agentkeel --log-format json COMMAND`` (or ``AGENTKEEL_LOG_FORMAT=json``, or
``[logging] format = "json"``) writes the logs to stderr as JSON lines: the run
events with their run and step ids, notes and errors; what a command prints on
stdout is unchanged.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from agentkeel.cli.approvals import approvals, approve, deny
from agentkeel.cli.audit import audit
from agentkeel.cli.chat import chat
from agentkeel.cli.common import (
    EXIT_CODES,
    EXIT_USAGE,
    LOG_FORMAT_ENV,
    LOG_LEVEL_ENV,
    LOG_LEVELS,
    json_logs,
    one_line,
    set_log_choice,
    with_disable_hint,
)
from agentkeel.cli.costs import costs
from agentkeel.cli.inspect import plugins, tools
from agentkeel.cli.keys import keys
from agentkeel.cli.memory import memory
from agentkeel.cli.run import run
from agentkeel.cli.runs import resume, rollback, runs, show
from agentkeel.cli.sandbox import sandbox
from agentkeel.cli.serve import serve
from agentkeel.errors import AgentkeelError, PluginError
from agentkeel.logs import FORMATS

__all__ = ["EXIT_CODES", "EXIT_USAGE", "cli", "main"]

log = logging.getLogger("agentkeel.cli")


@click.group()
@click.version_option(package_name="agentkeel")
@click.option("--log-format", type=click.Choice(FORMATS, case_sensitive=False), envvar=LOG_FORMAT_ENV,
              default=None, help=f"Logs on stderr as text or JSON lines (${LOG_FORMAT_ENV}; default "
                                 "[logging] format, else text).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False), envvar=LOG_LEVEL_ENV,
              default=None, help=f"The least severe records logged (${LOG_LEVEL_ENV}; default [logging] level, "
                                 "else info; without any logging setting only warnings are shown).")
@click.pass_context
def cli(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """Run AI agents in production: plugins, tools, sandboxes, budgets and audit."""
    set_log_choice(ctx, log_format, log_level)


for _command in (run, chat, tools, plugins, runs, show, resume, rollback, approvals, approve, deny, costs, audit,
                 sandbox, memory, serve, keys):
    cli.add_command(_command)


def _usage_line(exc: click.ClickException) -> str:
    line = f"error: {one_line(exc.format_message())}"
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        line += f" (see '{ctx.command_path} --help')"
    return line


def _error_line(exc: AgentkeelError) -> str:
    if isinstance(exc, PluginError):
        return f"error: {with_disable_hint(exc.plugin, str(exc))}"
    return f"error: {one_line(str(exc))}"


def _report(line: str) -> None:
    """An error line on stderr (an ERROR record when the logs are JSON lines)."""
    if json_logs():
        log.error("%s", line.removeprefix("error: "))
    else:
        click.echo(line, err=True)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, distinct exit codes, tracebacks on request."""
    try:
        code = cli.main(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: the help text, as click prints it
            exc.show()
        elif os.environ.get("AGENTKEEL_RAISE_ERRORS") and isinstance(exc.__cause__, AgentkeelError):
            raise
        else:
            _report(_usage_line(exc))
        sys.exit(EXIT_USAGE)
    except click.Abort:
        _report("aborted")
        sys.exit(130)
    except AgentkeelError as exc:
        if os.environ.get("AGENTKEEL_RAISE_ERRORS"):
            raise
        _report(_error_line(exc))
        sys.exit(EXIT_USAGE)
