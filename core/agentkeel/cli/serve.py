"""``agentkeel serve``: the HTTP service (needs ``pip install "agentkeel[server]"``)."""

from __future__ import annotations

import click

from agentkeel.cli.common import build_system, config_option, load_config, log_settings


@click.command()
@click.option("--host", default=None, help="Address to bind (default [server] host, else 127.0.0.1: loopback only).")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Port (default [server] port, else 8000; 0 picks a free one).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"],
                                               case_sensitive=False), default=None,
              help="The least severe records logged (default: agentkeel --log-level, $AGENTKEEL_LOG_LEVEL, "
                   "[logging] level, else info).")
@config_option
def serve(host: str | None, port: int | None, log_level: str | None, config_path: str | None) -> None:
    """Serve agent requests over HTTP with API keys (`agentkeel keys create`).

    The API is described at /openapi.json; /dashboard shows costs to an admin.
    SIGTERM stops taking runs, lets running steps finish (up to [server]
    shutdown_grace_s) and leaves unfinished runs resumable.

    `agentkeel --log-format json serve` (or [logging] format = "json") logs
    uvicorn's and agentkeel's records, and each run's events, as JSON lines.
    """
    try:
        from agentkeel.server.serve import serve as run_server
    except ImportError as exc:
        raise click.ClickException(f"the server needs its extra: pip install \"agentkeel[server]\" ({exc})") from exc
    config = load_config(config_path)
    log_format, chosen_level = log_settings(config)
    system = build_system(config)
    run_server(system, host=host, port=port, log_level=(log_level or chosen_level or "info").lower(),
               log_format=log_format or "text")
