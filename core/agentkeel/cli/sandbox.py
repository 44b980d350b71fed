"""``agentkeel sandbox``: build the docker sandbox images and diagnose the setup.

Attached to the main CLI with ``cli.add_command(sandbox)``. The docker modules
(and through them the Docker SDK) are imported inside the commands, so the rest
of the CLI (``agentkeel --help`` included) never loads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from agentkeel.errors import AgentkeelError

if TYPE_CHECKING:
    from agentkeel.sandbox.docker.settings import DockerSettings


def _settings(config_path: str | None) -> DockerSettings:
    from agentkeel.config import Config
    from agentkeel.sandbox.docker.settings import DockerSettings

    return DockerSettings.from_config(Config.load(config_path).section("sandbox", "docker"))


@click.group()
def sandbox() -> None:
    """Docker sandbox images and health."""


@sandbox.command()
@click.argument("plugin", required=False)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="agentkeel.toml to read.")
@click.option("--base-image", help="Base for the sandbox image (default: python:3.12-slim if present, "
                                   "else the debootstrap base agentkeel/base:bookworm, built if missing).")
@click.option("--wheelhouse", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Directory of wheels to use before repacking or downloading.")
@click.option("--quiet", "-q", is_flag=True, help="Only print the image names.")
def build(plugin: str | None, config_path: str | None, base_image: str | None, wheelhouse: Path | None,
          quiet: bool) -> None:
    """Build the sandbox image, and PLUGIN's image (or every installed plugin with docker tools).

    Nothing is pulled: the base is a local image, plugins and their dependencies
    are installed from wheels built or repacked on this host.
    """
    from agentkeel.sandbox.docker.build import (
        build_plugin_image,
        build_sandbox_image,
        docker_tool_plugins,
    )
    from agentkeel.sandbox.docker.client import connect
    echo = (lambda _text: None) if quiet else click.echo
    try:
        settings = _settings(config_path)
        api = connect(settings.base_url, timeout=600)
        base = base_image or settings.base_image
        click.echo(build_sandbox_image(api, echo, base))
        plugins = [plugin] if plugin else docker_tool_plugins()
        for name in plugins:
            click.echo(build_plugin_image(api, name, echo, base_image=base, wheelhouse=wheelhouse))
    except AgentkeelError as exc:
        raise click.ClickException(str(exc)) from exc


@sandbox.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="agentkeel.toml to read.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.option("--no-round-trip", is_flag=True, help="Skip running a container.")
def doctor(config_path: str | None, as_json: bool, no_round_trip: bool) -> None:
    """Check the Docker engine, runc, images and containers; advise on each problem."""
    from agentkeel.sandbox.docker.doctor import run_checks
    try:
        settings = _settings(config_path)
        checks = list(run_checks(settings.base_url, round_trip=not no_round_trip))
    except AgentkeelError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([{"name": c.name, "ok": c.ok, "detail": c.detail, "advice": c.advice} for c in checks],
                              indent=2))
    else:
        for check in checks:
            mark = "ok  " if check.ok else "FAIL"
            click.echo(f"{mark} {check.name}: {check.detail}")
            if check.advice and not check.ok:
                click.echo(f"     -> {check.advice}")
    if not all(c.ok for c in checks):
        raise SystemExit(1)
