"""MCP tools over stdio, end to end: a real server process (``mcp_test_server.py``) started by the
plugin, its tools registered and called through the whole runtime (permissions, router, breaker,
retries, journal) with a scripted plan.

Most tests share one system over one server (``shared``); those that crash, kill or count server
processes start their own."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

from agentkeel import AgentRequest, RunStatus, StepStatus
from agentkeel.testing import ScriptedPlanner

from tests.plugins.mcp.helpers import (
    SERVER,
    PlanSwitch,
    Shared,
    alive,
    calls,
    pids,
    plan,
    stdio_server,
    step,
    system,
    wait_gone,
)

ALL_TOOLS = ["crash", "fail", "flaky_read", "flaky_write", "greet", "picture", "pid", "read", "sandbox_facts",
             "slow", "stats", "tag", "untag", "whoami", "write"]
PRINCIPALS = {
    "tester": {"permissions": ["files:read", "files:write"]},
    "reader": {"permissions": ["files:read"]},
    "nobody": {"permissions": ["other"]},
}
WRITER = {"tester": {"permissions": ["files:read", "files:write"]}}


def files(state: Path, **extra: Any) -> dict[str, Any]:
    return {"files": stdio_server(state, permissions=["files:read"], **extra)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("mcp-stdio")
    state = root / "state"
    state.mkdir()
    tools = {"write": {"permissions": ["files:write"], "rollback": "files.tag", "timeout": 5},
             "slow": {"timeout": 0.5}}
    shared = Shared(root, files(state, tools=tools), PRINCIPALS)
    try:
        yield shared
    finally:
        shared.close()


def wait_for(path: Path, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


# --- listing --------------------------------------------------------------------------


def test_tools_are_listed_with_schemas_source_and_derived_metadata(shared: Shared) -> None:
    tools = shared.system.tools.all()
    assert sorted(name for name in tools if name.startswith("files.")) == [f"files.{n}" for n in ALL_TOOLS]
    read = tools["files.read"]
    assert read.args_schema["type"] == "object"
    assert read.args_schema["properties"]["path"]["type"] == "string"
    assert read.args_schema["required"] == ["path"]
    assert read.output_schema is not None
    assert set(read.output_schema["properties"]) == {"path", "size", "pid"}
    assert read.description == "Read a file of the test folder."
    assert read.source == f"mcp stdio server 'files': {sys.executable} {SERVER}"
    assert read.plugin == "agentkeel_mcp.plugin"
    assert read.isolation == "inprocess" and read.is_async
    assert read.idempotent is True and read.retry_safe
    assert read.permissions == frozenset({"files:read"})
    assert dict(read.derived) == {"idempotent": "readOnlyHint", "permissions": "config [mcp.servers.files]",
                                  "timeout": "default 30s"}
    write = tools["files.write"]
    assert write.idempotent is False and not write.retry_safe
    assert write.permissions == frozenset({"files:write"})  # the tool's own list replaces the server's
    assert write.rollback == "files.tag"
    assert write.timeout == 5.0
    assert dict(write.derived) == {
        "idempotent": "destructiveHint",
        "permissions": "config [mcp.servers.files.tools.write]",
        "timeout": "config [mcp.servers.files.tools.write]",
        "rollback": "config [mcp.servers.files.tools.write]",
    }
    assert (tools["files.tag"].idempotent, tools["files.tag"].derived["idempotent"]) == (True, "idempotentHint")
    assert tools["files.untag"].idempotent is False
    assert tools["files.untag"].derived["idempotent"].startswith("idempotentHint ignored")
    assert tools["files.greet"].idempotent is False
    assert tools["files.greet"].derived["idempotent"].startswith("no readOnlyHint or idempotentHint")
    assert tools["files.stats"].output_schema is None  # the server declares none for a text answer


def test_prefix_include_exclude_and_operator_overrides(state: Path) -> None:
    servers = {
        "a": stdio_server(state, prefix="fs", include=["read", "write", "greet"], idempotent=False,
                          tools={"greet": {"idempotent": True, "cost_usd": 0.25, "rate_limit": 2,
                                           "requires_approval": True}}),
        "b": stdio_server(state, prefix="", exclude=[n for n in ALL_TOOLS if n not in ("pid", "greet")]),
    }
    sys_ = system(servers)
    try:
        tools = sys_.tools.all()
    finally:
        sys_.close()
    assert sorted(n for n in tools if n.startswith("fs.")) == ["fs.greet", "fs.read", "fs.write"]
    assert "greet" in tools and "pid" in tools and "read" not in tools  # prefix = "": bare names
    assert tools["fs.read"].idempotent is False  # the server's override beats readOnlyHint
    assert tools["fs.read"].derived["idempotent"] == "config [mcp.servers.a]"
    greet = tools["fs.greet"]
    assert (greet.idempotent, greet.cost_usd, greet.rate_limit, greet.requires_approval) == (True, 0.25, 2.0, True)
    assert greet.derived["cost_usd"] == greet.derived["idempotent"] == "config [mcp.servers.a.tools.greet]"
    assert tools["pid"].source.startswith("mcp stdio server 'b': ")
    assert tools["pid"].derived["permissions"] == "none configured: explicit grant only"
    assert tools["pid"].permissions == frozenset()
    assert len(pids(state)) == 2  # the two servers were started at once, one process each


# --- calls and results ------------------------------------------------------------------------


def test_results_are_mapped_to_json_values(shared: Shared) -> None:
    response = shared.run(step("files.read", path="x.txt"), step("files.stats", n=3),
                          step("files.greet", name="ada"), step("files.picture"))
    assert response.status is RunStatus.SUCCEEDED, response.message
    structured, as_json, text, picture = (s.result for s in response.steps)
    assert structured == {"path": "x.txt", "size": 0, "pid": pids(shared.root / "state")[0]}
    assert as_json == {"n": 3, "squares": [0, 1, 4]}
    assert text == {"text": "hello ada"}
    assert picture == {"content": [{"type": "image", "mime_type": "image/png", "size_bytes": 32},
                                   {"type": "text", "text": "a tiny picture"}]}


def test_a_tool_error_fails_the_step_with_the_servers_message(shared: Shared) -> None:
    response = shared.run(step("files.fail", reason="disk on fire"))
    assert response.status is RunStatus.FAILED
    (failed,) = response.steps
    assert failed.status is StepStatus.FAILED
    assert "cannot do it: disk on fire" in (failed.error or "")
    assert "mcp server 'files'" in (failed.error or "")
    assert failed.attempts == 1


def test_a_destructive_tool_that_fails_is_attempted_exactly_once(shared: Shared) -> None:
    response = shared.run(step("files.flaky_write", key="once"))
    (failed,) = response.steps
    assert failed.status is StepStatus.FAILED
    assert failed.attempts == 1
    assert calls(shared.root / "state", "flaky_write-once") == 1  # counted by the server: it ran once
    assert "transient failure number 1" in (failed.error or "")
    assert "not retried" in (failed.error or "")


def test_a_read_only_tool_that_fails_is_retried(shared: Shared) -> None:
    response = shared.run(step("files.flaky_read", key="twice", fail_times=2))
    assert response.status is RunStatus.SUCCEEDED, response.message
    (ok,) = response.steps
    assert ok.attempts == 3  # [retry] max_attempts defaults to 3
    assert ok.result == {"key": "twice", "calls": 3}
    assert calls(shared.root / "state", "flaky_read-twice") == 3


def test_a_timeout_cancels_the_mcp_request_and_leaves_a_destructive_step_in_doubt(shared: Shared) -> None:
    started = time.monotonic()
    response = shared.run(step("files.slow", seconds=30, mark="timeout"))
    assert time.monotonic() - started < 10
    (slow,) = response.steps
    assert slow.status is StepStatus.IN_DOUBT
    assert "timed out after 0.5s" in (slow.error or "")
    marker = shared.root / "state" / "cancelled-timeout"
    assert wait_for(marker), "the server never saw the request cancelled"
    assert marker.read_text() == "cancelled\n"
    # The server is still up for the next call.
    assert shared.run(step("files.greet", name="again")).steps[0].result == {"text": "hello again"}


# --- permissions --------------------------------------------------------------------------------


def test_configured_permissions_are_required(shared: Shared) -> None:
    allowed = shared.run(step("files.read", path="x"), user="reader")
    denied = shared.run(step("files.read", path="x"), user="nobody")
    assert allowed.status is RunStatus.SUCCEEDED, allowed.message
    assert allowed.steps[0].result["path"] == "x"
    assert denied.status is not RunStatus.SUCCEEDED
    assert not any(s.status is StepStatus.SUCCEEDED for s in denied.steps)
    assert "files:read" in denied.message
    write_denied = shared.run(step("files.write", path="a", text="b"), user="reader")
    assert write_denied.status is not RunStatus.SUCCEEDED
    assert "files:write" in write_denied.message
    assert not (shared.root / "state" / "files" / "a").exists()


def test_a_tool_without_permissions_needs_an_explicit_grant(state: Path) -> None:
    servers = {"files": stdio_server(state, include=["pid", "greet"])}
    principals = {"listed": {"permissions": [], "tools": ["files.pid"]}, "other": {"permissions": ["anything"]}}
    sys_ = system(servers, ScriptedPlanner(plan(step("files.pid"))), principals=principals)
    try:
        allowed = sys_.run_sync(AgentRequest(message="go", user_id="listed"))
        denied = sys_.run_sync(AgentRequest(message="go", user_id="other"))
    finally:
        sys_.close()
    assert sys_.tools["files.pid"].permissions == frozenset()
    assert allowed.status is RunStatus.SUCCEEDED, allowed.message
    assert allowed.steps[0].result == {"pid": pids(state)[0]}
    assert denied.status is not RunStatus.SUCCEEDED
    assert not any(s.status is StepStatus.SUCCEEDED for s in denied.steps)
    assert "files.pid" in denied.message


# --- crashes and restarts ---------------------------------------------------------------------


def test_a_crashed_server_is_restarted_on_the_next_call_within_a_budget(state: Path) -> None:
    planner = PlanSwitch()
    sys_ = system(files(state, max_restarts=1, restart_window_s=60), planner, principals=WRITER)

    def go(*steps: dict[str, Any]) -> Any:
        planner.wire = plan(*steps)
        return sys_.run_sync(AgentRequest(message="go", user_id="tester"))

    try:
        first = go(step("files.pid"), step("files.crash"))
        assert [s.status for s in first.steps] == [StepStatus.SUCCEEDED, StepStatus.FAILED]
        pid_before = first.steps[0].result["pid"]
        crashed = first.steps[1]
        assert crashed.attempts == 1  # destructive: never retried
        assert "mcp server 'files'" in (crashed.error or "")
        assert "was lost during the call of its tool 'crash'" in (crashed.error or "")
        assert wait_gone(pid_before)
        second = go(step("files.pid"))
        assert second.steps[0].status is StepStatus.SUCCEEDED, second.steps[0].error
        pid_after = second.steps[0].result["pid"]
        assert pid_after != pid_before
        assert pids(state) == [pid_before, pid_after]
        assert "was lost during the call" in (go(step("files.crash")).steps[0].error or "")
        # max_restarts = 1 is used up: calls fail fast (a read-only tool is retried, failing fast each time).
        third = go(step("files.pid")).steps[0]
        assert third.status is StepStatus.FAILED
        assert "restarted 1 time(s) in the last 60s" in (third.error or "")
        assert "calls fail fast" in (third.error or "")
        assert len(pids(state)) == 2
    finally:
        sys_.close()


def test_a_server_that_died_while_idle_is_restarted_before_the_call(state: Path) -> None:
    planner = ScriptedPlanner(plan(step("files.write", path="a.txt", text="hello")))
    sys_ = system(files(state, tools={"write": {"permissions": ["files:write"]}}), planner, principals=WRITER)
    try:
        (first_pid,) = pids(state)
        os.kill(first_pid, signal.SIGKILL)
        assert wait_gone(first_pid)
        response = sys_.run_sync(AgentRequest(message="go", user_id="tester"))
    finally:
        sys_.close()
    # The write is not retry-safe, so it was not retried: the restart came before the call.
    assert response.status is RunStatus.SUCCEEDED, response.message
    assert response.steps[0].attempts == 1
    assert (state / "files" / "a.txt").read_text() == "hello"
    assert len(pids(state)) == 2


# --- lifecycle ----------------------------------------------------------------------------------


def test_systems_share_a_server_and_the_last_one_closing_stops_it(state: Path) -> None:
    first = system(files(state), ScriptedPlanner(plan(step("files.pid"))), principals=WRITER)
    second = system(files(state), ScriptedPlanner(plan(step("files.pid"))), principals=WRITER)
    try:
        (pid,) = pids(state)  # one process for both systems
        first.close()
        assert alive(pid)
        response = second.run_sync(AgentRequest(message="go", user_id="tester"))
        assert response.steps[0].result == {"pid": pid}
    finally:
        first.close()
        second.close()
    assert wait_gone(pid)
    assert pids(state) == [pid]


# --- [tools.NAME] overrides of MCP tools ------------------------------------------------------


def test_a_tools_override_is_shown_as_where_the_value_came_from(state: Path) -> None:
    sys_ = system(files(state, include=["read"]), tools={"files.read": {"timeout": 7}})
    try:
        read = sys_.tools["files.read"]
    finally:
        sys_.close()
    assert read.timeout == 7.0
    assert read.derived["timeout"] == "config [tools.files.read]"
    assert read.derived["idempotent"] == "readOnlyHint"


def test_an_mcp_tool_cannot_be_moved_out_of_the_process(state: Path) -> None:
    from agentkeel.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tools\.files\.read\.isolation: .*\[mcp\.servers\.NAME\] isolation"):
        system(files(state, include=["read"]), tools={"files.read": {"isolation": "subprocess"}})
