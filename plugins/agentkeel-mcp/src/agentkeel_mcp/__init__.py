"""agentkeel-mcp: the tools of MCP servers as agentkeel tools.

Configure servers under ``[mcp.servers.NAME]`` in agentkeel.toml (see the
README); the ``mcp`` entry point (``agentkeel_mcp.plugin``) registers their
tools as ``NAME.tool``.
"""

from agentkeel_mcp.runtime import (
    ConnectionLost,
    McpServerError,
    McpStartupError,
    ServerUnavailable,
    stop_all,
)

__version__ = "0.1.0"

__all__ = [
    "ConnectionLost",
    "McpServerError",
    "McpStartupError",
    "ServerUnavailable",
    "__version__",
    "stop_all",
]
