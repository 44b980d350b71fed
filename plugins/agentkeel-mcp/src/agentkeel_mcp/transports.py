"""The transports of the SDK, as this plugin uses them.

- stdio: ``mcp.client.stdio.stdio_client`` (it spawns the server in its own
  process group and stops it by the spec's sequence), with the server's stderr
  read into a bounded tail (``StderrTail``) that error messages quote and the
  ``agentkeel_mcp.server`` logger receives line by line.
- streamable HTTP: ``mcp.client.streamable_http.streamable_http_client`` over an
  ``httpx2`` client carrying the configured headers.
- stdio in a Docker container: ``agentkeel_mcp.docker_transport``.

``watch_eof`` wraps a transport's read stream so the connection learns that the
server went away (its stdout closed) before the next call is sent to it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TextIO

import anyio
import httpx2
from mcp.client._transport import ReadStream, TransportStreams
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from agentkeel_mcp.config import ServerConfig

server_log = logging.getLogger("agentkeel_mcp.server")

HTTP_TIMEOUT_S = 30.0
"""Connect, write and pool timeout of the HTTP client (a call's own deadline is the tool's timeout)."""
HTTP_READ_TIMEOUT_S = 300.0
"""How long a response stream may stay silent (a server may hold it open)."""


class StderrTail:
    """The last lines a server wrote to stderr, read by a daemon thread from a pipe."""

    def __init__(self, server: str, max_lines: int = 40, max_chars: int = 2000) -> None:
        self.server = server
        self.max_chars = max_chars
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._lock = threading.Lock()
        self.closed = threading.Event()
        """Set when every writer closed the pipe (the server and its children exited)."""

    def open_writer(self) -> TextIO:
        """A pipe whose write end is the server's stderr; the caller closes it once the child holds it."""
        read_fd, write_fd = os.pipe()
        threading.Thread(target=self._read, args=(read_fd,), name=f"mcp-stderr-{self.server}", daemon=True).start()
        return os.fdopen(write_fd, "w", encoding="utf-8", errors="replace")

    def _read(self, fd: int) -> None:
        try:
            with os.fdopen(fd, "rb") as pipe:
                for raw in pipe:
                    self.add(raw.decode("utf-8", "replace").rstrip())
        finally:
            self.closed.set()

    def add(self, line: str) -> None:
        if not line.strip():
            return
        server_log.debug("[%s] %s", self.server, line)
        with self._lock:
            self._lines.append(line)

    def text(self) -> str:
        """The tail as one line (``" | "`` between lines), at most ``max_chars``."""
        with self._lock:
            lines = [line.strip() for line in self._lines]
        text = " | ".join(line for line in lines if line)
        return text if len(text) <= self.max_chars else "..." + text[-self.max_chars:]


@asynccontextmanager
async def stdio_transport(cfg: ServerConfig, tail: StderrTail) -> AsyncIterator[TransportStreams]:
    """Start the server as a child process and talk to it over its stdin/stdout."""
    assert cfg.command is not None
    params = StdioServerParameters(command=cfg.command, args=list(cfg.args), env=dict(cfg.env) or None, cwd=cfg.cwd)
    errlog = tail.open_writer()
    try:
        async with stdio_client(params, errlog=errlog) as streams:
            errlog.close()  # the child has its own copy: the pipe ends when the server exits
            yield streams
    finally:
        errlog.close()


class HttpStatus:
    """The last error status the HTTP server answered (the SDK turns it into a bare MCP error)."""

    def __init__(self) -> None:
        self.last: tuple[int, str] | None = None

    async def record(self, response: httpx2.Response) -> None:
        code = response.status_code
        self.last = (code, response.reason_phrase) if code >= 400 else None

    def describe(self) -> str:
        if self.last is None:
            return ""
        code, reason = self.last
        hint = ": check its headers (the token's environment variable)" if code in (401, 403) else ""
        return f"HTTP {code} {reason}".rstrip() + hint


@asynccontextmanager
async def http_transport(cfg: ServerConfig, status: HttpStatus | None = None) -> AsyncIterator[TransportStreams]:
    """Connect to a streamable-HTTP server, sending the configured headers on every request."""
    assert cfg.url is not None
    timeout = httpx2.Timeout(HTTP_TIMEOUT_S, read=HTTP_READ_TIMEOUT_S)
    hooks = {"response": [status.record]} if status is not None else {}
    async with (
        httpx2.AsyncClient(headers=dict(cfg.headers), timeout=timeout, event_hooks=hooks) as http,
        streamable_http_client(cfg.url, http_client=http) as streams,
    ):
        yield streams


class _WatchedReadStream:
    """A read stream that calls ``on_eof`` when the transport's stream ends or breaks."""

    def __init__(self, inner: ReadStream[SessionMessage | Exception], on_eof: Callable[[], None]) -> None:
        self._inner = inner
        self._on_eof = on_eof

    @property
    def last_context(self) -> Any:  # the sender's context, when the transport keeps one
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_eof()
            raise

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        await self.aclose()
        return None


@asynccontextmanager
async def watch_eof(
    transport: Any, on_eof: Callable[[], None]
) -> AsyncIterator[TransportStreams]:
    """``transport`` (an async context manager of ``TransportStreams``) with its end reported to ``on_eof``."""
    async with transport as (read_stream, write_stream):
        yield _WatchedReadStream(read_stream, on_eof), write_stream
