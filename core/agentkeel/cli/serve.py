"""``agentkeel serve``: the HTTP service (needs ``pip install "agentkeel[server]"``)."""

from __future__ import annotations

import click

from agentkeel.cli.common import build_system, config_option, load_config


@click.command()
@click.option("--host", default=None, help="Address to bind (default [server] host, else 127.0.0.1: loopback only).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port (default [server] port, else 8000; 0 picks a free one).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
@config_option
def serve(host: str | None, port: int | None, log_level: str, config_path: str | None) -> None:
    """Serve agent requests over HTTP with API keys (`agentkeel keys create`).

    The API is described at /openapi.json; /dashboard shows costs to an admin.
    SIGTERM stops taking runs, lets running steps finish (up to [server]
    shutdown_grace_s) and leaves unfinished runs resumable.
    """
    try:
        from agentkeel.server.serve import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"the server needs its extra: pip install \"agentkeel[server]\" ({exc})") from exc
    config = load_config(config_path)
    system = build_system(config)
    run_server(system, host=host, port=port, log_level=log_level)
