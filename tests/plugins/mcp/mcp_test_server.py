"""A real MCP server for the agentkeel-mcp tests, on the SDK's own server API (``MCPServer``).

``python mcp_test_server.py`` serves over stdio; ``python mcp_test_server.py --http PORT``
serves streamable HTTP on 127.0.0.1:PORT at ``/mcp``, and then refuses (HTTP 401) every
request whose ``Authorization`` header is not ``Bearer $MCP_TEST_TOKEN``.

State shared with the test lives in ``$MCP_TEST_STATE`` (a folder): ``pids`` (one line per
server process started), ``calls-TOOL-KEY`` (one line per call of the counting tools) and
``cancelled-MARK`` (written when a ``slow`` call is cancelled).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from mcp.server.mcpserver import Context, Image, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel

STATE = Path(os.environ["MCP_TEST_STATE"])
READ_ONLY = ToolAnnotations(read_only_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True)

server = MCPServer("agentkeel-test")


def count(name: str) -> int:
    """Record one call of ``name`` and return how many there were."""
    path = STATE / f"calls-{name}"
    with path.open("a") as f:
        f.write("x\n")
    return len(path.read_text().splitlines())


class FileInfo(BaseModel):
    path: str
    size: int
    pid: int


@server.tool(annotations=READ_ONLY)
def read(path: str) -> FileInfo:
    """Read a file of the test folder."""
    target = STATE / "files" / path
    return FileInfo(path=path, size=len(target.read_bytes()) if target.exists() else 0, pid=os.getpid())


@server.tool(annotations=DESTRUCTIVE)
def write(path: str, text: str) -> dict[str, Any]:
    """Write (overwrite) a file of the test folder."""
    target = STATE / "files" / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return {"path": path, "written": len(text)}


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True))
def tag(name: str) -> dict[str, str]:
    """Set a tag (additive and idempotent)."""
    return {"tag": name}


@server.tool(annotations=ToolAnnotations(idempotent_hint=True))
def untag(name: str) -> dict[str, str]:
    """Remove a tag (idempotent, but it does not say it is not destructive)."""
    return {"untagged": name}


@server.tool(structured_output=False)
def stats(n: int) -> str:
    """Answer JSON as text."""
    return json.dumps({"n": n, "squares": [i * i for i in range(n)]})


@server.tool(structured_output=False)
def greet(name: str) -> str:
    """Answer plain text."""
    return f"hello {name}"


@server.tool(structured_output=False)
def picture() -> list[Any]:
    """Answer an image and a caption."""
    return [Image(data=b"\x89PNG\r\n\x1a\n" + b"\0" * 24, format="png"), "a tiny picture"]


@server.tool()
def fail(reason: str) -> str:
    """Always fail with ``reason`` (an isError result)."""
    raise ToolError(f"cannot do it: {reason}")


@server.tool(annotations=DESTRUCTIVE)
def flaky_write(key: str) -> dict[str, Any]:
    """A destructive tool that fails transiently, every time (calls counted per ``key``)."""
    n = count(f"flaky_write-{key}")
    raise ToolError(f"transient failure number {n} for {key}")


@server.tool(annotations=READ_ONLY)
def flaky_read(key: str, fail_times: int = 1) -> dict[str, Any]:
    """A read-only tool that fails its first ``fail_times`` calls (counted per ``key``)."""
    n = count(f"flaky_read-{key}")
    if n <= fail_times:
        raise ToolError(f"transient failure number {n} for {key}")
    return {"key": key, "calls": n}


@server.tool(annotations=READ_ONLY)
def pid() -> dict[str, int]:
    """The server's process id."""
    return {"pid": os.getpid()}


@server.tool(annotations=DESTRUCTIVE)
def crash() -> str:
    """Kill the server process mid-call."""
    os._exit(7)


@server.tool(annotations=DESTRUCTIVE)
async def slow(seconds: float, mark: str = "slow") -> str:
    """Sleep; a cancelled call leaves the file ``cancelled-MARK`` in the state folder."""
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        (STATE / f"cancelled-{mark}").write_text("cancelled\n")
        raise
    return "slept"


@server.tool(annotations=READ_ONLY)
def whoami(ctx: Context) -> dict[str, Any]:
    """The Authorization header the request came with (None over stdio)."""
    headers = ctx.headers or {}
    return {"authorization": headers.get("authorization")}


@server.tool(annotations=READ_ONLY)
def sandbox_facts() -> dict[str, Any]:
    """What the server's process can see of its sandbox (for the Docker isolation test)."""
    try:
        Path("/should-not-be-writable").write_text("x")
        root_writable = True
    except OSError:
        root_writable = False
    interfaces = sorted(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else []
    with open("/proc/self/status") as f:
        caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "")
    return {"uid": os.getuid(), "gid": os.getgid(), "root_writable": root_writable, "interfaces": interfaces,
            "cap_eff": caps, "pid": os.getpid(), "env_secret": os.environ.get("MCP_TEST_SECRET")}


def _require_token(app: Any) -> Any:
    expected = f"Bearer {os.environ['MCP_TEST_TOKEN']}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong token"})
            return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    with (STATE / "pids").open("a") as f:
        f.write(f"{os.getpid()}\n")
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        import uvicorn

        app = _require_token(server.streamable_http_app())
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    else:
        print("agentkeel-test server starting", file=sys.stderr)
        server.run()


if __name__ == "__main__":
    main()
