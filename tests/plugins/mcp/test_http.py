"""MCP tools over streamable HTTP: the test server (``mcp_test_server.py --http``) runs in a
subprocess on a free 127.0.0.1 port and refuses requests without ``Authorization: Bearer TOKEN``,
which the plugin sends from the environment variable named in ``headers``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

from agentkeel import AgentRequest, RunStatus, StepStatus
from agentkeel.errors import PluginError

from tests.plugins.mcp.helpers import (
    TOKEN,
    HttpServer,
    PlanSwitch,
    Shared,
    calls,
    free_port,
    http_config,
    pids,
    plan,
    step,
    system,
)

PRINCIPALS = {"tester": {"permissions": ["web:use"]}, "nobody": {"permissions": []}}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Shared, HttpServer]]:
    root = tmp_path_factory.mktemp("mcp-http")
    state = root / "state"
    state.mkdir()
    server = HttpServer(state).start()
    previous = os.environ.get("MCP_TEST_BEARER")
    os.environ["MCP_TEST_BEARER"] = f"Bearer {TOKEN}"
    try:
        shared = Shared(root, {"web": http_config(server, permissions=["web:use"])}, PRINCIPALS)
        try:
            yield shared, server
        finally:
            shared.close()
    finally:
        if previous is None:
            os.environ.pop("MCP_TEST_BEARER", None)
        else:
            os.environ["MCP_TEST_BEARER"] = previous
        server.stop()


def test_tools_are_listed_with_their_source_and_metadata(shared: tuple[Shared, HttpServer]) -> None:
    sys_, server = shared
    tools = sys_.system.tools.all()
    read = tools["web.read"]
    assert read.source == f"mcp streamable-http server 'web': {server.url}"
    assert read.args_schema["properties"]["path"]["type"] == "string"
    assert read.output_schema is not None and read.output_schema["required"] == ["path", "size", "pid"]
    assert dict(read.derived) == {"idempotent": "readOnlyHint", "permissions": "config [mcp.servers.web]",
                                  "timeout": "default 30s"}
    assert tools["web.write"].idempotent is False
    assert tools["web.write"].derived["idempotent"] == "destructiveHint"
    assert "TOKEN" not in read.source and TOKEN not in str(read.to_dict())  # the secret is never shown


def test_calls_results_and_the_header_from_the_environment(shared: tuple[Shared, HttpServer]) -> None:
    sys_, server = shared
    response = sys_.run(step("web.whoami"), step("web.read", path="p"), step("web.stats", n=2),
                        step("web.greet", name="bob"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    whoami, read, stats, greet = (s.result for s in response.steps)
    assert whoami == {"authorization": f"Bearer {TOKEN}"}  # what the server received
    assert read == {"path": "p", "size": 0, "pid": server.proc.pid if server.proc else None}
    assert stats == {"n": 2, "squares": [0, 1]}
    assert greet == {"text": "hello bob"}


def test_a_tool_error_fails_the_step(shared: tuple[Shared, HttpServer]) -> None:
    sys_, _ = shared
    (failed,) = sys_.run(step("web.fail", reason="no route")).steps
    assert failed.status is StepStatus.FAILED
    assert "cannot do it: no route" in (failed.error or "")
    assert "mcp server 'web'" in (failed.error or "")


def test_retries_follow_the_derived_metadata(shared: tuple[Shared, HttpServer]) -> None:
    sys_, _ = shared
    state = sys_.root / "state"
    (destructive,) = sys_.run(step("web.flaky_write", key="h1")).steps
    assert (destructive.status, destructive.attempts) == (StepStatus.FAILED, 1)
    assert calls(state, "flaky_write-h1") == 1
    (read_only,) = sys_.run(step("web.flaky_read", key="h2", fail_times=1)).steps
    assert (read_only.status, read_only.attempts) == (StepStatus.SUCCEEDED, 2)
    assert calls(state, "flaky_read-h2") == 2


def test_permissions_are_enforced(shared: tuple[Shared, HttpServer]) -> None:
    sys_, _ = shared
    denied = sys_.run(step("web.read", path="p"), user="nobody")
    assert denied.status is not RunStatus.SUCCEEDED
    assert "web:use" in denied.message


def test_a_crashed_http_server_is_reconnected_once_it_is_back(http_server: HttpServer, state: Path) -> None:
    planner = PlanSwitch()
    sys_ = system({"web": http_config(http_server, restart_backoff_s=0)}, planner,
                  principals={"tester": {"permissions": [], "tools": ["web.pid", "web.crash", "web.write"]}})
    restarted: list[HttpServer] = []

    def go(*steps: dict[str, Any]) -> Any:
        planner.wire = plan(*steps)
        return sys_.run_sync(AgentRequest(message="go", user_id="tester"))

    try:
        first = go(step("web.pid"), step("web.crash"))
        before = first.steps[0].result["pid"]
        crashed = first.steps[1]
        assert crashed.status is StepStatus.FAILED and crashed.attempts == 1
        assert "mcp server 'web'" in (crashed.error or "") and "was lost during the call" in (crashed.error or "")
        http_server.stop()  # reap it: its port is free once every thread of it has exited
        down = go(step("web.pid")).steps[0]
        assert down.status is StepStatus.FAILED
        assert "cannot connect to" in (down.error or "") and "mcp server 'web'" in (down.error or "")
        # The operator brings it back on the same port.
        restarted.append(HttpServer(state, port=http_server.port).start())
        back = go(step("web.pid"), step("web.write", path="w.txt", text="after")).steps
        assert [s.status for s in back] == [StepStatus.SUCCEEDED, StepStatus.SUCCEEDED], [s.error for s in back]
        assert back[0].result["pid"] != before
        assert back[1].attempts == 1
        assert (state / "files" / "w.txt").read_text() == "after"
        assert len(pids(state)) == 2
        # Restarted while the connection is idle: the next call still reaches the new server, once.
        restarted[-1].stop()
        restarted.append(HttpServer(state, port=http_server.port).start())
        again = go(step("web.write", path="w.txt", text="again")).steps[0]
        assert (again.status, again.attempts) == (StepStatus.SUCCEEDED, 1), again.error
        assert (state / "files" / "w.txt").read_text() == "again"
    finally:
        sys_.close()
        for server in restarted:
            server.stop()


def test_a_missing_environment_variable_is_refused_naming_server_and_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MCP_TEST_BEARER", raising=False)
    url = f"http://127.0.0.1:{free_port()}/mcp"  # never contacted: the configuration is refused first
    with pytest.raises(PluginError) as info:
        system({"web": {"url": url, "headers": {"Authorization": "MCP_TEST_BEARER"}}})
    message = str(info.value)
    assert "mcp.servers.web.headers.Authorization" in message
    assert "mcp server 'web'" in message and "MCP_TEST_BEARER" in message and "not set" in message


def test_a_wrong_token_fails_the_start_naming_the_server(shared: tuple[Shared, HttpServer],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _, server = shared
    monkeypatch.setenv("MCP_TEST_BEARER", "Bearer wrong")
    with pytest.raises(PluginError) as info:
        system({"web": http_config(server, startup_timeout_s=5)})
    message = str(info.value)
    assert f"mcp server 'web' ({server.url}) failed to start" in message
    assert "HTTP 401 Unauthorized" in message
    assert "wrong" not in message  # the header's value is never shown


def test_a_refused_connection_fails_the_start_naming_the_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    with pytest.raises(PluginError) as info:
        system({"down": {"url": url, "startup_timeout_s": 5}})
    message = str(info.value)
    assert f"mcp server 'down' ({url}) failed to start" in message
    assert "cannot connect to" in message
