"""Run the app under uvicorn, with a graceful shutdown on SIGTERM or SIGINT.

uvicorn, told to exit, stops accepting connections and then waits for the open
ones (a ``/v1/runs/wait`` call, a stream) to close before the app's lifespan
ends. So the drain starts at the signal, not at the lifespan's end: the runs are
paused at their next step boundary (``RunManager.drain``), their waiting
clients get the paused response, their streams end, and uvicorn's wait ends.
What is still running ``shutdown_grace_s`` later is interrupted; every run left
unfinished stays resumable from the journal.
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import uvicorn

from agentkeel.logs import ROOT_LOGGER, configure, configured_format
from agentkeel.runtime.system import AgentSystem
from agentkeel.server.app import create_app
from agentkeel.server.service import Service
from agentkeel.server.settings import ServerSettings

log = logging.getLogger("agentkeel.server")


class _Server(uvicorn.Server):
    """uvicorn's server, starting the drain of the runs as soon as it is told to exit."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain: asyncio.Future[None] | None = None

    async def serve(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self.loop
        if loop is not None and self.drain is None:
            grace = self.service.settings.shutdown_grace_s
            log.info("shutting down: no new runs; running ones stop at their next step (up to %.0f s)", grace)

            def start() -> None:
                self.drain = asyncio.ensure_future(self.service.manager.drain(grace))

            loop.call_soon_threadsafe(start)
        super().handle_exit(sig, frame)


def serve(system: AgentSystem, *, host: str | None = None, port: int | None = None,
          log_level: str | None = None, log_format: str | None = None) -> None:
    """Serve ``system`` over HTTP until SIGTERM or SIGINT (``agentkeel serve``).

    ``log_format`` "text" (uvicorn's lines) or "json" (``agentkeel.logs.JsonFormatter``
    for agentkeel's and uvicorn's loggers) and ``log_level`` default to the config's
    ``[logging]``, else text and info. (The run events are logged when ``system`` has
    an ``agentkeel.logs.EventLog`` plugin: ``agentkeel serve`` adds it with JSON logs.)"""
    settings = ServerSettings.from_config(system.config)
    section = system.config.section("logging")
    log_format = (log_format or str(section.get("format") or "text")).lower()
    log_level = (log_level or str(section.get("level") or "info")).lower()
    _configure_logs(log_format, log_level)
    app = create_app(system, settings=settings)
    service: Service = app.state.service
    # JSON: uvicorn keeps the handlers just installed (its own config would replace them with text ones).
    log_config: dict[str, Any] | None = None if log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(
        app, host=host or settings.host, port=settings.port if port is None else port, log_level=log_level,
        log_config=log_config, timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5, access_log=False,
        lifespan="on", server_header=False,
    )
    _Server(config, service).run()


def _configure_logs(log_format: str, level: str) -> None:
    """agentkeel's own messages (takeovers, shutdown, failed runs) on stderr, as uvicorn's are
    (text), or every record as a JSON line. A handler someone else put on the ``agentkeel``
    logger is left to do the work in text mode, as it always was."""
    if log_format == "text" and configured_format() is None and logging.getLogger(ROOT_LOGGER).handlers:
        logging.getLogger(ROOT_LOGGER).setLevel(level.upper())
        return
    configure(log_format, level)
