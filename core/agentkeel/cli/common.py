"""What every ``agentkeel`` command shares: exit codes, the ``--config`` option,
the logging choice (``agentkeel --log-format/--log-level``, else ``[logging]``),
building the system, printing responses (the answer first, then the run line,
the steps and the cost), and checking what the user typed.

Input checks run before anything is loaded, and fail as click usage errors that
name the argument, so bad input gets one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import click

from agentkeel.config import CONFIG_FILENAME, Config
from agentkeel.logs import EventLog, configure, configured_format, unconfigure
from agentkeel.types import AgentResponse, PlanRevision, RunStatus, StepResult

if TYPE_CHECKING:
    from agentkeel.runtime.system import AgentSystem

EXIT_CODES: dict[RunStatus, int] = {
    RunStatus.SUCCEEDED: 0,
    RunStatus.FAILED: 1,
    RunStatus.DENIED: 3,
    RunStatus.BUDGET_EXHAUSTED: 4,
    RunStatus.REJECTED: 5,
    RunStatus.IN_DOUBT: 6,
    RunStatus.WAITING: 7,
    RunStatus.RUNNING: 8,
    RunStatus.ROLLING_BACK: 8,
    RunStatus.ROLLED_BACK: 9,
    RunStatus.DEGRADED: 10,
    RunStatus.CANCELLED: 11,
}
EXIT_USAGE = 2
"""Usage or configuration error: bad arguments, a bad agentkeel.toml, a broken plugin."""

DISABLE_ENV = "AGENTKEEL_DISABLE_PLUGINS"

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="agentkeel.toml to use (default: $AGENTKEEL_CONFIG, ./agentkeel.toml, embedded defaults).",
)

json_option = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


# --- logging ---------------------------------------------------------------------

LOG_FORMAT_ENV = "AGENTKEEL_LOG_FORMAT"
LOG_LEVEL_ENV = "AGENTKEEL_LOG_LEVEL"
LOG_LEVELS = ("debug", "info", "warning", "error")
"""The levels of ``--log-level`` and ``[logging] level``."""
_LOG_CHOICE = "agentkeel.log_choice"

log = logging.getLogger("agentkeel.cli")


@attrs.frozen
class LogChoice:
    """What the command line (or its environment) chose for the logs: None when not given."""

    format: str | None = None
    level: str | None = None


def set_log_choice(ctx: click.Context, log_format: str | None, log_level: str | None) -> None:
    """Remember the global ``--log-format``/``--log-level`` for the command's ``load_config``,
    and log as chosen at once (the configuration may choose later what is left open). Each
    command line starts afresh: nothing an earlier one in this process chose stays."""
    choice = LogChoice(log_format.lower() if log_format else None, log_level.lower() if log_level else None)
    ctx.meta[_LOG_CHOICE] = choice
    if choice.format or choice.level:
        configure(choice.format or "text", choice.level or "info")
    else:
        unconfigure()


def log_choice() -> LogChoice:
    """The choice of the command line being run (nothing chosen outside a command)."""
    ctx = click.get_current_context(silent=True)
    choice = ctx.meta.get(_LOG_CHOICE) if ctx is not None else None
    return choice if isinstance(choice, LogChoice) else LogChoice()


def log_settings(config: Config) -> tuple[str | None, str | None]:
    """(format, level): the command line's, else ``[logging]``'s, else None."""
    choice = log_choice()
    section = config.section("logging")
    fmt = choice.format or section.get("format")
    level = choice.level or section.get("level")
    return (fmt if isinstance(fmt, str) else None), (level if isinstance(level, str) else None)


def apply_logging(config: Config) -> None:
    """Log as the command line, else ``config``'s ``[logging]``, says. When neither says
    anything the CLI logs as it always has (warnings only, plain)."""
    fmt, level = log_settings(config)
    if fmt is not None or level is not None:
        configure(fmt or "text", level or "info")


def json_logs() -> bool:
    """True when the logs are JSON lines (stderr then holds JSON records, not notes)."""
    return configured_format() == "json"


def warn(text: str) -> None:
    """A note for the user on stderr; a WARNING record when the logs are JSON."""
    if json_logs():
        log.warning("%s", text.removeprefix("note: "))
    else:
        click.echo(text, err=True)


# --- configuration and the system ------------------------------------------------


def load_config(config_path: str | None) -> Config:
    """The configuration (``ConfigError`` names the bad field); an unreadable file is a usage error.
    Its ``[logging]`` applies to what the command line left open (``apply_logging``)."""
    try:
        config = Config.load(config_path)
    except (OSError, UnicodeDecodeError) as exc:
        where = config_path or os.environ.get("AGENTKEEL_CONFIG") or CONFIG_FILENAME
        why = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else (exc.strerror or str(exc))
        raise click.ClickException(f"cannot read the configuration file {where}: {why}") from exc
    apply_logging(config)
    if config.is_embedded_default:
        warn(demo_note(config))
    return config


def demo_note(config: Config) -> str:
    """The warning printed whenever the embedded demo defaults are in use."""
    granted = "; ".join(
        f"{name!r} holds {', '.join(sorted(p.permissions)) or 'no permissions'}"
        for name, p in sorted(config.principals.items())
    )
    return (f"note: no agentkeel.toml found; using the embedded demo defaults. The demo principals are active "
            f"({granted}): anyone who can run this command as them can use those tools. Write an agentkeel.toml "
            f"with your own principals before serving real users.")


def build_system(config: Config, *, tolerant: bool = False) -> AgentSystem:
    """The system for ``config``. ``tolerant=True`` (the listings only) leaves out a
    plugin that fails to load or register and records it in ``system.broken_plugins``;
    otherwise such a plugin raises ``PluginError``, which ``main`` prints as one line.
    With JSON logs, each run's events are logged too (``agentkeel.logs.EventLog``)."""
    from agentkeel.runtime.system import AgentSystem

    if tolerant:
        return AgentSystem(config, tolerant=True)
    return AgentSystem(config, plugins=[EventLog()] if json_logs() else ())


def disable_hint(plugin: str) -> str:
    return f"to run without it, set {DISABLE_ENV}={plugin}"


def with_disable_hint(plugin: str, error: str) -> str:
    """``error`` about ``plugin``, ending with how to run without it (once)."""
    error = one_line(error)
    if DISABLE_ENV in error or not plugin or plugin == "unknown":
        return error
    return f"{error}; {disable_hint(plugin)}"


# --- output ----------------------------------------------------------------------


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: lone surrogates and control characters
    (an escape sequence in a tool's output or a model's answer could rewrite the
    screen) escaped; newlines and tabs kept."""
    safe = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROLS.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), safe)


def one_line(text: str) -> str:
    """``text`` on one line, printable on any stream (``printable``)."""
    flat = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return printable(flat)


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def when(ts: float) -> str:
    """A journal timestamp as the CLI prints it (UTC)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def exit_code(response: AgentResponse) -> int:
    """The documented exit code of a response: its status, except that a run that
    failed because of the configuration (no planner can run, say) is a usage error."""
    if response.status is RunStatus.FAILED and getattr(response, "config_error", False):
        return EXIT_USAGE
    return EXIT_CODES[response.status]


def step_line(s: StepResult) -> str:
    line = f"  {s.step_id:>2} {s.tool_name:<20} {s.status.value:<12} {s.duration_s:8.4f}s  ${s.cost_usd:.6f}"
    if s.error:
        line += f"  {one_line(s.error)}"
    return line


def revision_line(revision: PlanRevision) -> str:
    """``  plan revision N (reason, planner P)``: the header of a revision's steps."""
    planner = f", planner {revision.plan.planner}" if revision.plan.planner else ""
    cost = f", planning ${revision.planning_cost_usd:.6f}" if revision.planning_cost_usd else ""
    return f"  plan revision {revision.number} ({revision.reason}{planner}{cost})"


def by_revision(
    revisions: Sequence[PlanRevision], steps: Sequence[StepResult]
) -> Iterator[tuple[PlanRevision | None, list[StepResult]]]:
    """Each revision with the steps it planned, in order; steps no revision names come last (None)."""
    owner = {s.step_id: r.number for r in revisions for s in r.plan.steps}
    for revision in revisions:
        yield revision, [s for s in steps if owner.get(s.step_id) == revision.number]
    rest = [s for s in steps if s.step_id not in owner]
    if rest:
        yield None, rest


def print_response(
    response: AgentResponse, *, always_message: bool = False, answer: bool = True, revisions: bool = False
) -> None:
    """The answer (unless ``answer=False``: it was streamed already), the run line, the
    steps (grouped by plan revision when ``revisions`` or when the run was replanned),
    the cost line, and the status detail when the run did not simply succeed."""
    if answer and response.answer.strip():
        click.echo(printable(response.answer.rstrip("\n")))
    planner = f" (planner {response.plan.planner})" if response.plan and response.plan.planner else ""
    click.echo(f"run {response.run_id}: {response.status.value}{planner}")
    if revisions or len(response.revisions) > 1:
        for revision, steps in by_revision(response.revisions, response.steps):
            if revision is not None:
                click.echo(revision_line(revision) + ("" if steps else ": no steps"))
            for s in steps:
                click.echo(step_line(s))
    else:
        for s in response.steps:
            click.echo(step_line(s))
    breakdown = response.cost_breakdown()
    tiers = ", ".join(f"{k} ${v:.6f}" for k, v in breakdown["by_tier"].items()) or "no LLM calls"
    click.echo(f"total ${response.total_cost_usd:.6f} ({tiers}) in {response.duration_s:.3f}s")
    if always_message or response.status is not RunStatus.SUCCEEDED or not response.steps:
        if response.message:
            click.echo(printable(response.message))


def emit_response(
    response: AgentResponse, as_json: bool, *, always_message: bool = False, answer: bool = True
) -> None:
    if as_json:
        echo_json(response.to_dict())
    else:
        print_response(response, always_message=always_message, answer=answer)


def finish(response: AgentResponse, as_json: bool, *, answer: bool = True) -> NoReturn:
    """Print ``response`` and exit with its documented code (``answer=False``: the
    answer was streamed to the terminal already)."""
    emit_response(response, as_json, answer=answer)
    sys.exit(exit_code(response))


def command_line(*args: str, config_path: str | None = None) -> str:
    """``agentkeel ARGS [--config F]``, quoted for a shell: the next command to run."""
    words = ["agentkeel", *args, *(("--config", config_path) if config_path else ())]
    return " ".join(shlex.quote(w) for w in words)


# --- input checks ----------------------------------------------------------------


def text_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable text for an argument, or None.

    Python turns bytes in argv that are not UTF-8 into lone surrogates
    (surrogateescape); such text cannot be stored, printed or sent, so it is refused.
    """
    if not value.strip():
        return "must not be empty"
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        return "is not valid UTF-8 (it holds bytes that do not decode); pass UTF-8 text"
    return None


def _text(ctx: click.Context, param: click.Parameter, value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


def check_text(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: refuse empty or non-UTF-8 text, naming the argument."""
    return None if value is None else _text(ctx, param, value)


def check_utf8(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: refuse non-UTF-8 text (empty text is fine), naming the argument."""
    if value and value.strip():
        problem = text_problem(value)
        if problem:
            raise click.BadParameter(problem, ctx=ctx, param=param)
    return value


STDIN_MESSAGE = "-"


def check_message(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback for MESSAGE: ``-`` means read it from stdin; otherwise as ``check_text``."""
    return _text(ctx, param, read_stdin_text(ctx, param) if value == STDIN_MESSAGE else value)


def read_stdin_text(ctx: click.Context, param: click.Parameter) -> str:
    """All of stdin, decoded as UTF-8 and stripped; an empty stdin is a usage error."""
    buffer = getattr(sys.stdin, "buffer", None)
    try:
        text = buffer.read().decode("utf-8") if buffer is not None else sys.stdin.read()
    except UnicodeDecodeError:
        raise click.BadParameter("stdin is not valid UTF-8 text", ctx=ctx, param=param) from None
    text = text.strip()
    if not text:
        raise click.BadParameter("stdin ('-') is empty; pipe the message in or pass it as an argument",
                                 ctx=ctx, param=param)
    return text


def check_budget(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Click callback for ``--budget``: a finite amount of USD >= 0.

    ``nan`` would switch the cap off (every comparison with it is false) and
    ``inf`` is no cap at all, so both are refused, like a negative amount.
    """
    if value is None:
        return None
    if not math.isfinite(value):
        raise click.BadParameter(f"{value!r} is not a finite amount of USD", ctx=ctx, param=param)
    if value < 0:
        raise click.BadParameter("must not be negative", ctx=ctx, param=param)
    return value
