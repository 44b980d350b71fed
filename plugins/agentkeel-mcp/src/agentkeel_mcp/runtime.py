"""The MCP sessions of a process: one background event loop owns them all.

Registration is synchronous and tool calls arrive on whatever event loop runs
the system (``asyncio.run`` per CLI command, several loops one after another in
tests, uvicorn's loop in the service), while the SDK's sessions are anyio
context managers that must be entered and exited in one task. So one daemon
thread per process runs its own asyncio loop (``McpLoop``), and each server
connection is one task on it (``Connection``) that enters the transport and
the ``mcp.Client`` and waits until it is told to stop. Registration waits for
it with ``McpLoop.run``; a tool call is forwarded with ``McpLoop.forward``, and
cancelling the caller (the tool's timeout) cancels the MCP request (the SDK
sends ``notifications/cancelled``).

``ManagedServer`` keeps one live connection per configured server and
restarts it on the next call after it died, at most ``max_restarts`` times per
``restart_window_s`` with a doubling backoff; past that calls fail fast.
``ServerPool`` shares a server between the systems of a process that configure
it identically (reference counted through ``Lease``), so building a second
system does not start it again, and the last system that releases it stops it.
Everything still running at exit is stopped by an ``atexit`` hook.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import anyio
import httpx2
import mcp.types as types
from agentkeel.errors import AgentkeelError
from mcp import Client
from mcp.shared.exceptions import MCPError

from agentkeel_mcp.config import ServerConfig
from agentkeel_mcp.transports import HttpStatus, StderrTail, http_transport, stdio_transport, watch_eof

log = logging.getLogger("agentkeel_mcp")

T = TypeVar("T")

CLIENT_INFO = types.Implementation(name="agentkeel-mcp", version="0.1.0")
MAX_BACKOFF_S = 10.0
CLOSE_TIMEOUT_S = 10.0
"""How long stopping one connection may take (the SDK's stdio shutdown is bounded at about 6 s)."""
MAX_TOOL_PAGES = 100


class McpServerError(AgentkeelError):
    """Something about an MCP server went wrong; the message names the server."""


class McpStartupError(McpServerError):
    """An MCP server could not be started or connected to."""


class ConnectionLost(McpServerError):
    """The connection to an MCP server failed during a call; the next call restarts it."""


class ServerUnavailable(McpServerError):
    """The server was restarted too often: calls fail fast until ``retry_after_s`` has passed."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# --- the loop ------------------------------------------------------------------------


class McpLoop:
    """An asyncio loop on a daemon thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="agentkeel-mcp", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it from synchronous code (not from the loop's thread)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("McpLoop.run() called from the MCP loop itself")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"gave up after {timeout:g}s") from None

    async def forward(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` on the MCP loop from another loop; cancelling the caller cancels it there."""
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        if self.running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5.0)


# --- one connection ------------------------------------------------------------------


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, cancellations left out when others exist."""
    if isinstance(exc, BaseExceptionGroup):
        found = [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    else:
        found = [exc]
    real = [e for e in found if not isinstance(e, asyncio.CancelledError)]
    return real or found


def explain(exc: BaseException, cfg: ServerConfig, http: HttpStatus | None = None) -> str:
    """What went wrong, for a person: the leaf errors, the usual causes spelled out."""
    parts: list[str] = []
    status = http.describe() if http is not None else ""
    for leaf in leaves(exc):
        if isinstance(leaf, OSError) and cfg.isolation == "docker" and str(leaf).startswith("docker: "):
            parts.append(str(leaf))
        elif isinstance(leaf, FileNotFoundError) and cfg.transport == "stdio":
            if cfg.cwd is not None and leaf.filename == cfg.cwd:
                parts.append(f"its working directory {cfg.cwd!r} does not exist")
            else:
                parts.append(f"the command {cfg.command!r} was not found (is it installed and on PATH?)")
        elif isinstance(leaf, PermissionError) and cfg.transport == "stdio":
            parts.append(f"the command {cfg.command!r} cannot be run: {leaf.strerror}")
        elif isinstance(leaf, httpx2.ConnectError | httpx2.ConnectTimeout):
            parts.append(f"cannot connect to {cfg.url} ({leaf}): is the server running?")
        elif isinstance(leaf, MCPError) and leaf.code == types.CONNECTION_CLOSED:
            parts.append("the server closed the connection (it exited, or its stdout closed)"
                         if cfg.transport == "stdio" else "the connection was closed")
        elif isinstance(leaf, MCPError) and status:
            parts.append(f"the server answered {status}")
        elif isinstance(leaf, MCPError):
            parts.append(f"the server answered with MCP error {leaf.code}: {leaf.error.message}")
        else:
            parts.append(f"{type(leaf).__name__}: {leaf}")
    return "; ".join(dict.fromkeys(parts)) or type(exc).__name__


class Connection:
    """One connected session: a task on the MCP loop holds the transport and the client open."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.tail = StderrTail(cfg.name) if cfg.transport == "stdio" else None
        self.http_status = HttpStatus() if cfg.transport == "http" else None
        self.client: Client | None = None
        self.alive = False
        self.failure: BaseException | None = None
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, cfg: ServerConfig) -> Connection:
        """A connection that finished the MCP handshake, or ``McpStartupError`` naming the server."""
        conn = cls(cfg)
        conn._task = asyncio.create_task(conn._run(), name=f"mcp-server-{cfg.name}")
        try:
            async with asyncio.timeout(cfg.startup_timeout_s):
                problem = await asyncio.shield(conn._ready)
        except TimeoutError:
            await conn.close()
            raise McpStartupError(
                f"{cfg.label} did not finish the MCP handshake within {cfg.startup_timeout_s:g}s "
                f"(startup_timeout_s in {cfg.section}){await conn.stderr_note()}"
            ) from None
        except BaseException:
            await asyncio.shield(conn.close())
            raise
        if problem is not None:
            await conn.close()
            why = explain(problem, cfg, conn.http_status)
            raise McpStartupError(f"{cfg.label} failed to start: {why}{await conn.stderr_note()}")
        return conn

    def _transport(self) -> Any:
        cfg = self.cfg
        if cfg.transport == "http":
            inner = http_transport(cfg, self.http_status)
        elif cfg.isolation == "docker":
            from agentkeel_mcp.docker_transport import docker_transport

            assert self.tail is not None
            inner = docker_transport(cfg, self.tail)
        else:
            assert self.tail is not None
            inner = stdio_transport(cfg, self.tail)
        return watch_eof(inner, self._gone)

    def _gone(self) -> None:
        """The transport's read stream ended: the server is gone; wind the connection down."""
        if self.alive:
            log.info("%s: connection closed", self.cfg.label)
        self.alive = False
        self._stop.set()

    async def _run(self) -> None:
        try:
            async with Client(self._transport(), cache=None, client_info=CLIENT_INFO) as client:
                self.client = client
                self.alive = True
                self._ready.set_result(None)
                await self._stop.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded: it explains a failed start or a lost call
            self.failure = exc
            if self._ready.done():
                log.warning("%s: connection failed: %s", self.cfg.label, explain(exc, self.cfg, self.http_status))
        finally:
            self.alive = False
            if not self._ready.done():
                self._ready.set_result(self.failure or ConnectionError("closed before the handshake finished"))

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> types.CallToolResult:
        assert self.client is not None
        return await self.client.call_tool(name, arguments)

    async def list_tools(self) -> list[types.Tool]:
        assert self.client is not None
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_TOOL_PAGES):
            page = await self.client.list_tools(cursor=cursor)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if cursor is None:
                return tools
        raise McpServerError(f"{self.cfg.label}: tools/list returned more than {MAX_TOOL_PAGES} pages")

    async def wait_finished(self, timeout: float) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=timeout)

    def never_delivered(self) -> bool:
        """True when the connection failed before the request could reach a server (connection refused)."""
        if self.failure is None:
            return False
        return all(isinstance(e, httpx2.ConnectError | httpx2.ConnectTimeout) for e in leaves(self.failure))

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the session and the server (stdio: close its stdin, then terminate, then kill)."""
        self.alive = False
        self._stop.set()
        task = self._task
        if task is None or task.done():
            return
        if not self._ready.done():
            task.cancel()  # still in the handshake: nothing waits for the stop event yet
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=5.0)

    async def stderr_note(self) -> str:
        """``"; its stderr ended with: ..."`` for messages, once the pipe drained (briefly)."""
        if self.tail is None:
            return ""
        if not self.tail.closed.is_set():
            await asyncio.get_running_loop().run_in_executor(None, self.tail.closed.wait, 0.5)
        text = self.tail.text()
        return f"; its stderr ended with: {text}" if text else ""


# --- one configured server -------------------------------------------------------------


def _connection_gone(exc: MCPError) -> bool:
    return exc.code == types.CONNECTION_CLOSED or _session_terminated(exc)


def _session_terminated(exc: MCPError) -> bool:
    """The HTTP server no longer knows the session (it restarted): the request did not run."""
    return exc.code == types.INVALID_REQUEST and exc.error.message == "Session terminated"


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # a failed start nobody awaited any more is not an "unretrieved" error


class ManagedServer:
    """A configured server: its live connection, restarted on demand within a budget."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.refs = 0
        self.starts = 0
        """Connections made (1 after the first start; each restart adds one)."""
        self._attempts = 0
        self._conn: Connection | None = None
        self._starting: asyncio.Future[Connection] | None = None
        self._restarts: collections.deque[float] = collections.deque()
        self._closed = False

    async def connection(self) -> Connection:
        """The live connection, started (or restarted) first when there is none."""
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        if self._closed:
            raise ServerUnavailable(f"{self.cfg.label} was shut down")
        starting = self._starting
        if starting is None or starting.done():
            starting = self._starting = asyncio.ensure_future(self._start(conn))
            starting.add_done_callback(_retrieve)
        # Shielded: a caller that times out does not abandon the start for the callers after it.
        return await asyncio.shield(starting)

    async def _start(self, previous: Connection | None) -> Connection:
        if previous is not None:
            self._conn = None
            await previous.close()
        if self._attempts > 0:
            delay = self._admit_restart()
            if delay > 0:
                await asyncio.sleep(delay)
        self._attempts += 1
        conn = await Connection.open(self.cfg)
        if self._closed:
            await conn.close()
            raise ServerUnavailable(f"{self.cfg.label} was shut down")
        self.starts += 1
        self._conn = conn
        if self.starts > 1:
            log.info("%s: restarted (connection %d)", self.cfg.label, self.starts)
        return conn

    def _admit_restart(self) -> float:
        """Count a restart (``ServerUnavailable`` past the budget) and return its backoff delay."""
        cfg = self.cfg
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] >= cfg.restart_window_s:
            self._restarts.popleft()
        if len(self._restarts) >= cfg.max_restarts:
            wait = cfg.restart_window_s - (now - self._restarts[0]) if self._restarts else cfg.restart_window_s
            raise ServerUnavailable(
                f"{cfg.label} is down and was restarted {len(self._restarts)} time(s) in the last "
                f"{cfg.restart_window_s:g}s (max_restarts = {cfg.max_restarts} in {cfg.section}); calls fail "
                f"fast for {wait:.1f}s before it is started again",
                retry_after_s=max(wait, 0.0),
            )
        self._restarts.append(now)
        n = len(self._restarts)
        return 0.0 if n <= 1 else min(cfg.restart_backoff_s * 2 ** (n - 2), MAX_BACKOFF_S)

    async def list_tools(self) -> list[types.Tool]:
        conn = await self.connection()
        return await conn.list_tools()

    async def call(self, remote: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Call ``remote``; ``ConnectionLost`` when the transport failed (the next call restarts).

        A request that provably never reached a server (the connection was refused, or
        an HTTP server answered that it no longer knows the session) is sent once more
        on a new connection: it cannot have had an effect.
        """
        for attempt in (1, 2):
            conn = await self.connection()
            try:
                return await conn.call_tool(remote, arguments)
            except MCPError as exc:
                if not _connection_gone(exc):
                    raise
                conn.alive = False
                await conn.wait_finished(2.0)
                if attempt == 1 and (_session_terminated(exc) or conn.never_delivered()):
                    continue
                raise ConnectionLost(await self._lost(conn, remote, exc)) from exc
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream) as exc:
                conn.alive = False
                raise ConnectionLost(await self._lost(conn, remote, exc)) from exc
        raise AssertionError("unreachable")

    async def _lost(self, conn: Connection, remote: str, exc: BaseException) -> str:
        why = explain(conn.failure if conn.failure is not None else exc, self.cfg, conn.http_status)
        return (f"{self.cfg.label} was lost during the call of its tool {remote!r}: {why}; it is restarted "
                f"on the next call{await conn.stderr_note()}")

    async def stop(self) -> None:
        self._closed = True
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.wait({starting}, timeout=CLOSE_TIMEOUT_S)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


# --- the servers of the process -----------------------------------------------------------


class ServerPool:
    """Every configured server of the process, shared by identical configurations."""

    def __init__(self, loop: McpLoop) -> None:
        self.loop = loop
        self._servers: dict[tuple[Any, ...], ManagedServer] = {}
        self._lock = threading.Lock()

    def acquire(self, cfg: ServerConfig) -> ManagedServer:
        with self._lock:
            server = self._servers.get(cfg.key())
            if server is None:
                server = self._servers[cfg.key()] = ManagedServer(cfg)
            server.refs += 1
            return server

    def release(self, servers: Iterable[ManagedServer]) -> list[concurrent.futures.Future[None]]:
        """Drop one reference to each server; those nobody holds any more are stopped."""
        stopping: list[ManagedServer] = []
        with self._lock:
            for server in servers:
                server.refs -= 1
                if server.refs <= 0 and self._servers.get(server.cfg.key()) is server:
                    del self._servers[server.cfg.key()]
                    stopping.append(server)
        if not self.loop.running:
            return []
        return [self.loop.submit(server.stop()) for server in stopping]

    def servers(self) -> list[ManagedServer]:
        with self._lock:
            return list(self._servers.values())

    def stop_all(self, timeout: float = CLOSE_TIMEOUT_S + 5.0) -> None:
        with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
        if servers and self.loop.running:
            futures = [self.loop.submit(server.stop()) for server in servers]
            concurrent.futures.wait(futures, timeout=timeout)


class Lease:
    """The servers one registration (one system) holds; released once, at shutdown or when collected."""

    def __init__(self, pool: ServerPool, servers: Sequence[ManagedServer]) -> None:
        self.servers = tuple(servers)
        self._release = weakref.finalize(self, pool.release, self.servers)
        self._release.atexit = False  # at exit, Runtime.close stops everything (and waits)

    def release(self) -> list[concurrent.futures.Future[None]]:
        if not self._release.alive:
            return []
        futures = self._release()
        return list(futures or ())


class Runtime:
    """The process's loop and pool, created on first use."""

    def __init__(self) -> None:
        self.loop = McpLoop()
        self.pool = ServerPool(self.loop)

    def close(self) -> None:
        self.pool.stop_all()
        self.loop.stop()


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    global _runtime
    with _runtime_lock:
        if _runtime is None or not _runtime.loop.running:
            _runtime = Runtime()
            atexit.register(_runtime.close)
        return _runtime


def stop_all() -> None:
    """Stop every MCP server this process started (tests, and the ``atexit`` hook)."""
    with _runtime_lock:
        runtime = _runtime
    if runtime is not None:
        runtime.pool.stop_all()
