"""The ``agentkeel`` command line.

Errors print one clean line; set ``AGENTKEEL_RAISE_ERRORS=1`` for the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING

import click

from agentkeel.config import Config
from agentkeel.errors import AgentkeelError
from agentkeel.types import AgentRequest, AgentResponse, RunStatus

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
}
EXIT_USAGE = 2

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="agentkeel.toml to use (default: $AGENTKEEL_CONFIG, ./agentkeel.toml, embedded defaults).",
)


def load_config(config_path: str | None) -> Config:
    config = Config.load(config_path)
    if config.is_embedded_default:
        click.echo("note: no agentkeel.toml found; using the embedded demo defaults", err=True)
    return config


def build_system(config: Config) -> AgentSystem:
    from agentkeel.runtime.system import AgentSystem

    return AgentSystem(config)


@click.group()
@click.version_option(package_name="agentkeel")
def cli() -> None:
    """Run AI agents in production: plugins, tools, sandboxes, budgets and audit."""


@cli.command()
@click.argument("message")
@click.option("--user", "user_id", required=True, help="The principal making the request.")
@click.option("--session", "session_id", default="default", show_default=True)
@click.option("--budget", "budget_usd", type=float, default=None, help="Budget in USD for this request.")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
def run(message: str, user_id: str, session_id: str, budget_usd: float | None, config_path: str | None,
        as_json: bool) -> None:
    """Serve one request MESSAGE on behalf of --user."""
    if budget_usd is not None and budget_usd < 0:
        raise click.BadParameter("must not be negative", param_hint="--budget")
    config = load_config(config_path)
    system = build_system(config)
    request = AgentRequest(message=message, user_id=user_id, session_id=session_id, budget_usd=budget_usd)
    response: AgentResponse = system.run_sync(request)
    if as_json:
        click.echo(json.dumps(response.to_dict(), indent=2, default=str))
    else:
        print_response(response)
    sys.exit(EXIT_CODES[response.status])


def print_response(response: AgentResponse) -> None:
    planner = f" (planner {response.plan.planner})" if response.plan and response.plan.planner else ""
    click.echo(f"run {response.run_id}: {response.status.value}{planner}")
    for s in response.steps:
        line = f"  {s.step_id:>2} {s.tool_name:<20} {s.status.value:<12} {s.duration_s:8.4f}s  ${s.cost_usd:.6f}"
        if s.error:
            line += f"  {s.error}"
        click.echo(line)
    breakdown = response.cost_breakdown()
    tiers = ", ".join(f"{k} ${v:.6f}" for k, v in breakdown["by_tier"].items()) or "no LLM calls"
    click.echo(f"total ${response.total_cost_usd:.6f} ({tiers}) in {response.duration_s:.3f}s")
    if response.status is not RunStatus.SUCCEEDED or not response.steps:
        click.echo(response.message)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def tools(config_path: str | None, as_json: bool) -> None:
    """List every registered tool with its plugin and metadata."""
    system = build_system(load_config(config_path))
    specs = [spec.to_dict() for _, spec in sorted(system.tools.all().items())]
    if as_json:
        click.echo(json.dumps(specs, indent=2))
        return
    for t in specs:
        flags = "idempotent" if t["idempotent"] else ("takes key" if t["accepts_idempotency_key"] else "never twice")
        rollback = f" rollback={t['rollback']}" if t["rollback"] else ""
        fallback = f" fallback={t['fallback']}" if t["fallback"] else ""
        click.echo(
            f"{t['name']:<20} [{t['plugin']}] perms={','.join(t['permissions']) or '-'} {flags} "
            f"isolation={t['isolation']} timeout={t['timeout']:g}s{rollback}{fallback}"
        )


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True)
def plugins(config_path: str | None, as_json: bool) -> None:
    """List the loaded plugins with their version and hooks."""
    system = build_system(load_config(config_path))
    described = system.plugins.describe()
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for p in described:
        origin = "default" if p["default"] else (p["distribution"] or "registered")
        click.echo(f"{p['name']:<20} {origin} {p['version'] or ''}  hooks: {', '.join(p['hooks'])}")


def _attach_optional_commands() -> None:
    from agentkeel.cli.audit import audit
    from agentkeel.cli.runs import resume, rollback, runs, show

    for command in (audit, runs, show, resume, rollback):
        cli.add_command(command)
    try:
        from agentkeel.cli.sandbox import sandbox
    except ImportError:  # the docker sandbox commands are optional
        return
    cli.add_command(sandbox)


_attach_optional_commands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: clean errors, distinct exit codes, tracebacks on request."""
    try:
        code = cli.main(args=argv, standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except AgentkeelError as exc:
        if os.environ.get("AGENTKEEL_RAISE_ERRORS"):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
