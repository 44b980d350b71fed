"""A request whose plan runs a docker-isolated tool and run_python, each in its own container."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl, tool
from agentkeel.sandbox.docker import DockerBackend
from agentkeel.testing import ScriptedPlanner, make_system

pytestmark = pytest.mark.docker


class AbuseToolsPlugin:
    def __init__(self, specs: dict[str, Any], names: tuple[str, ...] = ("sandbox_info",)) -> None:
        self.specs = specs
        self.names = names

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        for name in self.names:
            register(self.specs[name])


@tool(idempotent=True, permissions=["sandbox-test"])
def echo(text: str) -> str:
    """An in-process tool: a request that uses only it needs no Docker."""
    return text


class EchoPlugin:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(echo)


async def test_request_runs_docker_tool_and_run_python(
    abuse_specs: dict[str, Any], pycode_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "pycode")
    planner = ScriptedPlanner({
        "reasoning": "inspect the sandbox, then compute",
        "steps": [
            {"description": "where am I", "tool_name": "sandbox_info", "tool_args": {}},
            {"description": "compute", "tool_name": "run_python",
             "tool_args": {"code": "import socket; print(sum(range(10)), socket.gethostname())"}},
        ],
    })
    system = make_system(AbuseToolsPlugin(abuse_specs), planner, principals={"agent": ["code", "sandbox-test"]},
                         config={"sandbox": {"docker": {"pool_size": 1}}}, load_entrypoints=True)
    assert system.tools["run_python"].plugin == "pycode"
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="agent"))
    assert response.status is RunStatus.SUCCEEDED, response.to_dict()
    info, code = response.steps
    assert info.status is StepStatus.SUCCEEDED and code.status is StepStatus.SUCCEEDED
    assert info.result["uid"] == 10001
    total, hostname = code.result["stdout"].split()
    assert total == "45"
    assert hostname != info.result["hostname"]  # each step in its own container


def test_cli_runs_docker_tool_and_run_python_each_in_its_own_container(
    pycode_image: str, tmp_path: Any
) -> None:
    """The issue's "done when": `agentkeel run` of a request whose steps include a
    docker-isolated tool and run_python, through the demo templates."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "agentkeel", "run",
         "describe the sandbox and run python: import socket; print(6 * 7, socket.gethostname())",
         "--user", "demo", "--json"],
        cwd=tmp_path, env={**os.environ, "AGENTKEEL_LOAD_PLUGINS": "pycode"},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    info, code = (s["result"] for s in out["steps"])
    assert info["uid"] == 10001 and info["network"] == ["lo"]
    answer, hostname = code["stdout"].split()
    assert answer == "42"
    assert hostname != info["hostname"]


@pytest.mark.parametrize("name", ["refuses", "refuses_custom"])
async def test_a_refusal_in_a_container_is_not_retried_and_spares_the_breaker(
    abuse_specs: dict[str, Any], name: str
) -> None:
    """The tools are idempotent, so only ``retryable=False`` coming back from the container stops a retry."""
    assert abuse_specs[name].idempotent
    planner = ScriptedPlanner({"reasoning": "", "steps": [{"description": "refuse", "tool_name": name,
                                                            "tool_args": {}}]})
    system = make_system(AbuseToolsPlugin(abuse_specs, (name,)), planner, principals={"agent": ["sandbox-test"]},
                         config={"sandbox": {"docker": {"pool_size": 0}}})
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="agent"))
        step = response.steps[0]
        assert step.status is StepStatus.FAILED
        assert step.attempts == 1, step
        assert system.breakers.get(name).consecutive_failures == 0


async def test_a_request_without_docker_tools_starts_no_container(
    abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    planner = ScriptedPlanner({"reasoning": "", "steps": [{"description": "echo", "tool_name": "echo",
                                                            "tool_args": {"text": "hi"}}]})
    system = make_system(AbuseToolsPlugin(abuse_specs), EchoPlugin(), planner, principals={"agent": ["sandbox-test"]},
                         config={"sandbox": {"docker": {"pool_size": 2}}})
    backend = system.sandboxes["docker"]
    assert isinstance(backend, DockerBackend)
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="agent"))
        assert response.status is RunStatus.SUCCEEDED, response.to_dict()
        assert running_containers(backend.owner) == []
        assert not backend.client.connected  # Docker was never contacted
    assert running_containers(backend.owner) == []


@pytest.mark.parametrize(
    ("name", "args", "succeeds"),
    [
        ("forge_reply_via_pid1", {}, True),
        ("forge_reply_via_pid1", {"deep": True}, True),
        ("writes_result", {"kind": "deep"}, False),
        ("writes_result", {"kind": "nan"}, False),
        ("returns_deep", {}, False),
        ("returns_nan", {}, False),
    ],
    ids=["forged-line", "deep-line", "writes-deep", "writes-nan", "returns-deep", "returns-nan"],
)
async def test_a_hostile_reply_ends_the_run_with_a_step_failure_or_the_real_result(
    abuse_specs: dict[str, Any], running_containers: Any, name: str, args: dict[str, Any], succeeds: bool
) -> None:
    planner = ScriptedPlanner({"reasoning": "", "steps": [{"description": "attack", "tool_name": name,
                                                            "tool_args": args}]})
    system = make_system(AbuseToolsPlugin(abuse_specs, (name,)), planner, principals={"agent": ["sandbox-test"]},
                         config={"sandbox": {"docker": {"pool_size": 0}}})
    backend = system.sandboxes["docker"]
    assert isinstance(backend, DockerBackend)
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="agent"))
        step = response.steps[0]
        if succeeds:
            assert response.status is RunStatus.SUCCEEDED, response.to_dict()
            assert step.result["/proc/1/fd/1"].startswith("PermissionError")  # the tool's own, real result
        else:
            assert response.status is RunStatus.FAILED, response.to_dict()
            assert step.status is StepStatus.FAILED and step.attempts == 1, step
            assert step.error and ("nested" in step.error or "NaN" in step.error), step.error
        assert system.show(response.run_id).status is response.status  # the journal says it ended
    assert running_containers(backend.owner) == []
