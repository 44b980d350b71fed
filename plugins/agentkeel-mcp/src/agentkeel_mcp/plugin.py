"""The ``mcp`` plugin: every ``[mcp.servers.NAME]`` of agentkeel.toml as a source of tools.

``agentkeel_register_tools`` validates the ``[mcp]`` section, starts (or
connects to) every configured server at once on the process's MCP loop, lists
their tools and registers each as ``NAME.tool`` (see ``metadata`` for what is
derived and how to override it). A server that cannot start fails the
registration with an error naming it, and the servers this registration
already started are stopped again. ``agentkeel_shutdown`` releases the servers
of the closing system (stopped once no other system of the process uses them).

A tool call is forwarded to the server by an async proxy (``make_proxy``):
- an ``isError`` result raises ``ToolError(retryable=<the tool is retry-safe>)``:
  the server answered, so the breaker does not count it against the server, and
  only a retry-safe tool is tried again;
- a lost connection (the server crashed, the HTTP connection broke) raises
  ``ToolError(retryable=True)``: a transient failure, counted by the tool's
  circuit breaker; the core still never retries a tool that is not retry-safe.
  The next call restarts the server (bounded, see ``runtime``);
- an MCP protocol error (unknown tool, invalid arguments) raises
  ``ToolError(retryable=False)``;
- a timeout (the core's ``asyncio.timeout`` around the call) cancels the MCP
  request; for a tool that is not retry-safe the core then leaves the step in_doubt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agentkeel.config import Config
from agentkeel.errors import ToolError
from agentkeel.markers import hookimpl
from agentkeel.types import ToolSpec
from mcp.shared.exceptions import MCPError

from agentkeel_mcp import config as mcp_config
from agentkeel_mcp.config import ServerConfig
from agentkeel_mcp.metadata import build_specs
from agentkeel_mcp.results import error_text, to_step_result
from agentkeel_mcp.runtime import (
    ConnectionLost,
    Lease,
    ManagedServer,
    McpServerError,
    McpStartupError,
    Runtime,
    ServerUnavailable,
    get_runtime,
)

# The SDK logs every line a server writes that is not JSON-RPC, with a traceback. Without a
# handler of the application's, those would reach stderr through logging's last resort; a server
# that never answers is reported once instead, as a start-up error naming it.
logging.getLogger("mcp").addHandler(logging.NullHandler())

REGISTRATION_SLACK_S = 30.0
"""How much longer than the slowest ``startup_timeout_s`` registration waits (listing tools, stopping)."""

_LEASES: weakref.WeakKeyDictionary[Callable[..., Any], Lease] = weakref.WeakKeyDictionary()
"""Each tool proxy's lease: the shutdown hook finds the servers of the closing system through its tools."""
_EMPTY_LEASES: dict[int, list[Lease]] = {}
"""Leases that registered no tool (every tool excluded), by ``id(config)``."""


def servers_of(config: Config) -> list[ServerConfig]:
    """The validated ``[mcp.servers.*]`` of ``config`` (``ConfigError`` naming the key path)."""
    raw = config.section("mcp")
    if not raw:
        return []
    source = config.source
    base_dir = Path(source).resolve().parent if Path(source).is_file() else None
    return mcp_config.parse(raw, source=source, base_dir=base_dir)


@hookimpl
def agentkeel_register_tools(register: Callable[[Any], None], config: Config) -> None:
    servers = servers_of(config)
    if not servers:
        return
    runtime = get_runtime()
    managed = [runtime.pool.acquire(cfg) for cfg in servers]
    lease = Lease(runtime.pool, managed)
    try:
        specs = _specs(runtime, lease, config.source)
        for spec in specs:
            register(spec)
    except BaseException:
        lease.release()
        raise
    if not specs:
        _EMPTY_LEASES.setdefault(id(config), []).append(lease)


def _specs(runtime: Runtime, lease: Lease, source: str) -> list[ToolSpec]:
    wait = max(s.cfg.startup_timeout_s for s in lease.servers) + REGISTRATION_SLACK_S
    try:
        listings = runtime.loop.run(_list_all(lease.servers), timeout=wait)
    except TimeoutError:
        names = ", ".join(repr(s.cfg.name) for s in lease.servers)
        raise McpStartupError(f"mcp servers {names}: listing their tools took longer than {wait:g}s") from None
    specs: list[ToolSpec] = []
    for server, listed in zip(lease.servers, listings, strict=True):
        specs += build_specs(server.cfg, listed, _proxy_factory(runtime, server, lease), source)
    return specs


async def _list_all(servers: tuple[ManagedServer, ...]) -> list[Any]:
    """Every server's tools, started concurrently; every failure reported at once."""
    results = await asyncio.gather(*(server.list_tools() for server in servers), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if not failures:
        return results
    messages = [str(f) if isinstance(f, McpServerError) else f"{s.cfg.label}: {type(f).__name__}: {f}"
                for s, f in zip(servers, results, strict=True) if isinstance(f, BaseException)]
    error = McpStartupError("; ".join(messages))
    raise error from failures[0]


def _proxy_factory(runtime: Runtime, server: ManagedServer, lease: Lease) -> Callable[[str, str, bool],
                                                                                    Callable[..., Any]]:
    def factory(remote: str, tool_name: str, retry_safe: bool) -> Callable[..., Any]:
        fn = make_proxy(runtime, server, remote, tool_name, retry_safe)
        _LEASES[fn] = lease
        return fn

    return factory


MAX_RESULT_BYTES = 1 << 20
"""The largest step result (JSON-encoded) an MCP tool may return: 1 MiB."""


def make_proxy(runtime: Runtime, server: ManagedServer, remote: str, tool_name: str,
               retry_safe: bool) -> Callable[..., Any]:
    """The async tool fn of ``tool_name``: calls ``remote`` on ``server`` with the step's arguments."""
    label = server.cfg.label

    async def call_mcp_tool(**arguments: Any) -> Any:
        try:
            result = await runtime.loop.forward(server.call(remote, arguments))
        except ServerUnavailable as exc:
            raise ToolError(str(exc), retryable=True, retry_after_s=exc.retry_after_s) from None
        except (ConnectionLost, McpStartupError) as exc:
            raise ToolError(str(exc), retryable=True) from None
        except MCPError as exc:
            raise ToolError(f"{label} refused the call of {remote!r}: {exc.error.message} (MCP error {exc.code})",
                            retryable=False) from None
        except McpServerError as exc:
            raise ToolError(str(exc), retryable=False) from None
        except (ValueError, TypeError, RuntimeError) as exc:  # an invalid answer (pydantic, output schema)
            raise ToolError(f"{label} answered the call of {remote!r} with something invalid: "
                            f"{type(exc).__name__}: {exc}", retryable=False) from None
        if result.is_error:
            raise ToolError(f"{label}: tool {remote!r} reported an error: {error_text(result)}", retryable=retry_safe)
        value = to_step_result(result)
        size = len(json.dumps(value, default=str))
        if size > MAX_RESULT_BYTES:
            # Every result is journaled, evaluated and may reach prompts: a server must not be able
            # to flood them. The call ran (its effect, if any, stands); its result is refused.
            raise ToolError(f"{label}: tool {remote!r} returned {size} bytes of result, more than the "
                            f"{MAX_RESULT_BYTES} a step result may hold", retryable=False)
        return value

    call_mcp_tool.__qualname__ = f"mcp[{tool_name}]"
    return call_mcp_tool


@hookimpl
def agentkeel_shutdown(config: Config, tools: Mapping[str, ToolSpec]) -> Any:
    leases = {id(lease): lease for spec in tools.values() if (lease := _LEASES.get(spec.fn)) is not None}
    for lease in _EMPTY_LEASES.pop(id(config), []):
        leases[id(lease)] = lease
    futures = [future for lease in leases.values() for future in lease.release()]
    if not futures:
        return None

    async def stopped() -> None:
        await asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)

    return stopped()
