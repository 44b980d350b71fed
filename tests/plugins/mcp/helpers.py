"""Helpers of the agentkeel-mcp tests: real MCP servers (``mcp_test_server.py``) over stdio and
streamable HTTP on loopback, and systems built over them with a scripted plan (no LLM).

Test modules import this after ``pytest.importorskip("mcp")``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import agentkeel_mcp.plugin
from agentkeel import AgentRequest, hookimpl
from agentkeel.planner.plan import parse_plan
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.types import AgentResponse, Plan, Progress

HERE = Path(__file__).parent
SERVER = HERE / "mcp_test_server.py"
BROKEN = HERE / "broken_servers.py"
TOKEN = "s3cret-test-token"


def stdio_server(state: Path, **extra: Any) -> dict[str, Any]:
    """A ``[mcp.servers.NAME]`` table starting the test server over stdio."""
    return {"command": sys.executable, "args": [str(SERVER)], "env": {"MCP_TEST_STATE": str(state)}, **extra}


def pids(state: Path) -> list[int]:
    path = state / "pids"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def calls(state: Path, name: str) -> int:
    path = state / f"calls-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def alive(pid: int) -> bool:
    """True while any thread of process ``pid`` runs (a zombie whose threads all exited is gone).

    The thread group's leader turns zombie before its other threads have exited, and the
    process's files (a listening socket) are closed only when the last one has: so every
    thread is looked at, not only the leader."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return True
        except OSError:
            continue
    return False


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def step(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"description": f"call {tool_name}", "tool_name": tool_name, "tool_args": args}


def plan(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"reasoning": "test", "steps": list(steps)}


def system(servers: Mapping[str, Any], *plugins: object, principals: Mapping[str, Any] | None = None,
           **config: Any) -> Any:
    """A system with the mcp plugin (and ``plugins``) over ``[mcp.servers]`` = ``servers``."""
    data: dict[str, Any] = {"mcp": {"servers": dict(servers)}, "retry": {"base_delay_s": 0.0}, **config}
    data["principals"] = dict(principals or {"tester": {"permissions": []}})
    return make_system(agentkeel_mcp.plugin, *plugins, config=data)


def run(servers: Mapping[str, Any], *steps: dict[str, Any], user: str = "tester",
        principals: Mapping[str, Any] | None = None, **config: Any) -> AgentResponse:
    """Build a system, run one request planned as ``steps``, close it."""
    sys_ = system(servers, ScriptedPlanner(plan(*steps)), principals=principals, **config)
    try:
        response: AgentResponse = sys_.run_sync(AgentRequest(message="go", user_id=user))
        return response
    finally:
        sys_.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class HttpServer:
    """The test server over streamable HTTP, in a subprocess on a free loopback port."""

    def __init__(self, state: Path, port: int | None = None) -> None:
        self.state = state
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HttpServer:
        env = {**os.environ, "MCP_TEST_STATE": str(self.state), "MCP_TEST_TOKEN": TOKEN}
        self.proc = subprocess.Popen([sys.executable, str(SERVER), "--http", str(self.port)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the HTTP test server exited: {self.proc.stderr.read()!r}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the HTTP test server did not listen within 20s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def http_config(server: HttpServer, **extra: Any) -> dict[str, Any]:
    return {"url": server.url, "headers": {"Authorization": "MCP_TEST_BEARER"}, **extra}


class PlanSwitch:
    """A planner plugin whose plan each test sets (``wire``), for a system shared by a module."""

    def __init__(self) -> None:
        self.wire: dict[str, Any] = plan()

    @hookimpl(tryfirst=True)
    def agentkeel_plan(self, progress: Progress | None = None) -> Plan | None:
        if progress is not None:
            return None
        return parse_plan(self.wire, planner="test")


class Shared:
    """One system over one server for a whole module (its state, journal and home in ``root``)."""

    def __init__(self, root: Path, servers: Mapping[str, Any], principals: Mapping[str, Any]) -> None:
        self.root = root
        self.planner = PlanSwitch()
        self.system = system(servers, self.planner, principals=principals, home=str(root / "home"),
                             journal={"backend": "memory"})

    def run(self, *steps: dict[str, Any], user: str = "tester") -> AgentResponse:
        self.planner.wire = plan(*steps)
        response: AgentResponse = self.system.run_sync(AgentRequest(message="go", user_id=user))
        return response

    def close(self) -> None:
        self.system.close()
