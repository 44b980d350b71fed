"""``agentkeel tools`` lists MCP tools with where they come from and where their metadata came from,
run as the real command (a subprocess, so the plugin is loaded from its entry point and the
server it started is stopped when the command exits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

from tests.cli.helpers import agentkeel
from tests.plugins.mcp.helpers import BROKEN, SERVER, pids, wait_gone


def write_config(path: Path, state: Path, extra: str = "") -> Path:
    path.write_text(f"""
[principals.demo]
permissions = ["files:read"]

[mcp.servers.files]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(SERVER))}]
env = {{MCP_TEST_STATE = {json.dumps(str(state))}}}
permissions = ["files:read"]
include = ["read", "write", "greet"]

[mcp.servers.files.tools.write]
permissions = ["files:write"]
timeout = 5
{extra}
""")
    return path


def test_agentkeel_tools_shows_mcp_tools_and_their_metadata(tmp_path: Path, state: Path) -> None:
    config = write_config(tmp_path / "agentkeel.toml", state)
    proc = agentkeel("tools", cwd=tmp_path, env={"AGENTKEEL_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    read = next(i for i, line in enumerate(lines) if line.startswith("files.read "))
    assert "perms=files:read idempotent isolation=inprocess timeout=30s" in lines[read]
    assert lines[read + 1].strip() == f"from mcp stdio server 'files': {sys.executable} {SERVER}"
    assert lines[read + 2].strip() == ("metadata: idempotent <- readOnlyHint, permissions <- config "
                                       "[mcp.servers.files], timeout <- default 30s")
    write = next(i for i, line in enumerate(lines) if line.startswith("files.write "))
    assert "perms=files:write never twice" in lines[write] and "timeout=5s" in lines[write]
    assert "metadata: idempotent <- destructiveHint, permissions <- config [mcp.servers.files.tools.write]" \
        in lines[write + 2]
    assert "files.pid" not in out  # not included
    (pid,) = pids(state)
    assert wait_gone(pid), "the MCP server outlived the command"


def test_agentkeel_tools_json_has_source_and_metadata_from(tmp_path: Path, state: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from agentkeel.cli.inspect import tools as tools_command
    from click.testing import CliRunner

    config = write_config(tmp_path / "agentkeel.toml", state)
    monkeypatch.setenv("AGENTKEEL_CONFIG", str(config))
    result = CliRunner().invoke(tools_command, ["--json"])  # in this process: the entry point is loaded here
    assert result.exit_code == 0, result.output
    tools = {t["name"]: t for t in json.loads(result.stdout)}
    greet = tools["files.greet"]
    assert greet["plugin"] == "mcp"
    assert greet["source"] == f"mcp stdio server 'files': {sys.executable} {SERVER}"
    assert greet["metadata_from"] == {
        "idempotent": "no readOnlyHint or idempotentHint (MCP default: not idempotent)",
        "permissions": "config [mcp.servers.files]",
        "timeout": "default 30s",
    }
    assert greet["args_schema"]["properties"]["name"]["type"] == "string"
    assert tools["files.read"]["metadata_from"]["idempotent"] == "readOnlyHint"


def test_agentkeel_tools_lists_a_broken_server_with_its_error(tmp_path: Path, state: Path) -> None:
    extra = f"""
[mcp.servers.broken]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(BROKEN))}, "exit"]
"""
    config = write_config(tmp_path / "agentkeel.toml", state, extra)
    proc = agentkeel("tools", cwd=tmp_path, env={"AGENTKEEL_CONFIG": str(config)})
    assert proc.returncode == 0, proc.stderr
    broken = [line for line in proc.stdout.splitlines() if "BROKEN" in line]
    assert len(broken) == 1 and broken[0].startswith("mcp ")
    assert "mcp server 'broken'" in broken[0] and "missing API key" in broken[0]
    assert "files.read" not in proc.stdout  # the plugin's registration failed as a whole...
    assert wait_gone(pids(state)[0])  # ...and the server it had started was stopped


def test_a_server_that_writes_garbage_is_one_clean_error(tmp_path: Path, state: Path) -> None:
    """The SDK logs each line it cannot parse with a traceback: a command shows none of them."""
    extra = f"""
[mcp.servers.junk]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(BROKEN))}, "garbage"]
startup_timeout_s = 2
"""
    config = write_config(tmp_path / "agentkeel.toml", state, extra)
    proc = agentkeel("run", "hello", "--user", "demo", cwd=tmp_path, env={"AGENTKEEL_CONFIG": str(config)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "not JSON-RPC" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: plugin 'mcp'") and "mcp server 'junk'" in line and "handshake" in line
