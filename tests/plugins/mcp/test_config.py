"""The ``[mcp]`` section: validation errors name the key path, start-up failures name the server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

import mcp.types as types
from agentkeel.errors import ConfigError, PluginError
from agentkeel_mcp.config import parse
from agentkeel_mcp.metadata import exposed

from tests.plugins.mcp.helpers import BROKEN, pids, stdio_server, system, wait_gone


def servers(**tables: Any) -> dict[str, Any]:
    return {"servers": tables}


def refusal(raw: dict[str, Any], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        parse(raw, source="agentkeel.toml", environ=environ or {})
    message = str(info.value)
    assert message.startswith("invalid configuration in agentkeel.toml")
    return message


@pytest.mark.parametrize(("raw", "expected"), [
    (servers(files={"command": "x", "commnd": "y"}), "mcp.servers.files.commnd: unknown key; mcp.servers.files takes"),
    ({"server": {}}, "mcp.server: unknown key"),
    (servers(files={"command": "x", "url": "http://127.0.0.1:1/mcp"}),
     "mcp.servers.files: give either command (a stdio server) or url (a streamable-HTTP server), not both"),
    (servers(files={"args": ["a"]}), "mcp.servers.files: needs command (a stdio server to start) or url"),
    (servers(files={"command": "x", "args": "s.py"}), "mcp.servers.files.args: 's.py' is not of type 'array'"),
    (servers(files={"command": "x", "timeout": "5"}), "mcp.servers.files.timeout: '5' is not of type 'number'"),
    (servers(files={"command": "x", "timeout": 0}), "mcp.servers.files.timeout: 0 is less than or equal to"),
    (servers(files={"command": "x", "idempotent": "yes"}), "mcp.servers.files.idempotent: 'yes' is not of type"),
    (servers(files={"command": "x", "permissions": ["ok", 3]}), "mcp.servers.files.permissions.1: 3 is not of type"),
    (servers(files={"command": "x", "tools": {"write": {"permisions": []}}}),
     "mcp.servers.files.tools.write.permisions: unknown key"),
    (servers(files={"command": "x", "tools": {"write": {"timeout": True}}}),
     "mcp.servers.files.tools.write.timeout: True is not of type 'number'"),
    (servers(**{"a.b": {"command": "x"}}), "mcp.servers: 'a.b' is not a valid server name"),
    (servers(web={"url": "ftp://example/mcp"}), "mcp.servers.web.url: 'ftp://example/mcp' is not an http:// or"),
    (servers(files={"command": "x", "headers": {"Authorization": "T"}}),
     "mcp.servers.files.headers: only for streamable-HTTP servers"),
    (servers(web={"url": "http://127.0.0.1:1/mcp", "args": []}), "mcp.servers.web.args: only for stdio servers"),
    (servers(web={"url": "http://127.0.0.1:1/mcp", "headers": {"Authorization": "not a name"}}),
     "mcp.servers.web.headers.Authorization: 'not a name' does not match"),
    (servers(files={"command": "x", "image": "i"}), "mcp.servers.files.image: only with isolation = \"docker\""),
    (servers(files={"command": "x", "isolation": "docker"}), "mcp.servers.files.image: isolation = \"docker\" needs"),
    (servers(files={"command": "x", "isolation": "vm"}), "mcp.servers.files.isolation: 'vm' is not one of"),
    (servers(files={"command": "x", "include": ["a"], "exclude": ["a"]}), "mcp.servers.files: a both included"),
    (servers(files={"command": "x", "volumes": {"/a": "/b"}}), "mcp.servers.files.volumes: only with isolation"),
    (servers(files={"command": "x", "isolation": "docker", "image": "i", "cwd": "rel"}),
     "mcp.servers.files.cwd: with isolation = \"docker\" it is a path in the container: it must be absolute"),
    (servers(files={"command": "x", "isolation": "docker", "image": "i", "volumes": {"/a": "b"}}),
     "mcp.servers.files.volumes./a: 'b' does not match"),
])
def test_invalid_configuration_names_the_key(raw: dict[str, Any], expected: str) -> None:
    assert expected in refusal(raw)


def test_every_problem_is_reported_at_once() -> None:
    message = refusal(servers(a={"command": 1}, b={"command": "x", "retries": 2}))
    assert "mcp.servers.a.command: 1 is not of type 'string'" in message
    assert "mcp.servers.b.retries: unknown key" in message


def test_environment_variables_are_read_and_a_missing_one_is_refused() -> None:
    raw = servers(web={"url": "http://127.0.0.1:9/mcp", "headers": {"Authorization": "WEB_TOKEN"}},
                  files={"command": "x", "env": {"A": "1"}, "env_from": {"API_KEY": "FILES_KEY"}})
    web, files = parse(raw, environ={"WEB_TOKEN": "Bearer t", "FILES_KEY": "k"})
    assert dict(web.headers) == {"Authorization": "Bearer t"}
    assert dict(files.env) == {"A": "1", "API_KEY": "k"}
    assert "Bearer t" not in repr(web) and "Bearer t" not in web.source
    message = refusal(raw, environ={"FILES_KEY": "k"})
    assert "mcp.servers.web.headers.Authorization: mcp server 'web' reads it from the environment variable " \
           "WEB_TOKEN, which is not set" in message


def test_defaults_and_relative_cwd() -> None:
    (files,) = parse(servers(files={"command": "python", "args": ["s.py"], "cwd": "srv"}), base_dir=Path("/etc/ak"))
    assert (files.prefix, files.startup_timeout_s, files.max_restarts, files.restart_window_s) == (
        "files", 20.0, 5, 60.0)
    assert files.cwd == "/etc/ak/srv"
    assert files.tool_name("read") == "files.read"
    assert files.source == "mcp stdio server 'files': python s.py"


def test_include_exclude_and_tool_sections_must_name_listed_tools() -> None:
    listed = [types.Tool(name=n, input_schema={"type": "object"}) for n in ("read", "write")]
    (cfg,) = parse(servers(files={"command": "x", "exclude": ["write"]}))
    assert [t.name for t in exposed(cfg, listed)] == ["read"]
    for table, where in (({"include": ["red"]}, "mcp.servers.files.include: 'red'"),
                         ({"exclude": ["wirte"]}, "mcp.servers.files.exclude: 'wirte'"),
                         ({"tools": {"wrte": {"timeout": 1}}}, "files.tools: mcp.servers.files.tools.wrte")):
        (cfg,) = parse(servers(files={"command": "x", **table}))
        with pytest.raises(ConfigError, match="is not a tool of mcp server 'files'") as info:
            exposed(cfg, listed)
        assert where in str(info.value) and "(it lists: read, write)" in str(info.value)


def test_a_bad_section_fails_the_system_naming_the_key() -> None:
    with pytest.raises(PluginError) as info:
        system({"files": {"command": sys.executable, "arg": []}})
    assert "mcp.servers.files.arg: unknown key" in str(info.value)


# --- start-up failures ----------------------------------------------------------------------


def start_failure(table: dict[str, Any], name: str = "broken") -> str:
    with pytest.raises(PluginError) as info:
        system({name: table})
    message = str(info.value)
    assert f"mcp server {name!r}" in message
    assert "AGENTKEEL_DISABLE_PLUGINS" in message  # the host says how to run without the plugin
    return message


def test_a_command_that_does_not_exist() -> None:
    message = start_failure({"command": "/nonexistent/mcp-server", "args": ["--stdio"]})
    assert "the command '/nonexistent/mcp-server' was not found" in message


def test_a_working_directory_that_does_not_exist(tmp_path: Path) -> None:
    message = start_failure({"command": sys.executable, "cwd": str(tmp_path / "missing")})
    assert "does not exist" in message


def test_a_server_that_exits_at_once_shows_its_stderr() -> None:
    message = start_failure({"command": sys.executable, "args": [str(BROKEN), "exit"]})
    assert "failed to start: the server closed the connection" in message
    assert "its stderr ended with: fatal: the test server refuses to start (missing API key)" in message


def test_a_server_that_never_answers_times_out() -> None:
    message = start_failure({"command": sys.executable, "args": [str(BROKEN), "silent"], "startup_timeout_s": 0.5})
    assert "did not finish the MCP handshake within 0.5s (startup_timeout_s in [mcp.servers.broken])" in message


def test_a_failed_start_stops_the_servers_already_started(state: Path) -> None:
    with pytest.raises(PluginError) as info:
        system({"good": stdio_server(state), "bad": {"command": "/nonexistent/mcp-server"}})
    assert "mcp server 'bad'" in str(info.value) and "mcp server 'good'" not in str(info.value)
    (pid,) = pids(state)  # the good one was started alongside...
    assert wait_gone(pid)  # ...and stopped again
