"""The sandbox_docker plugin loads and registers without Docker (no engine needed), and a
request that needs no docker tool never contacts Docker."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import pytest
from agentkeel import AgentRequest, Config, RunStatus, StepStatus, hookimpl, tool
from agentkeel.errors import SandboxError
from agentkeel.sandbox.docker import DockerBackend
from agentkeel.sandbox.docker import plugin as sandbox_docker
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
from agentkeel.testing import ScriptedPlanner, make_system


@pytest.fixture
def no_docker(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")


def test_registers_a_docker_backend_from_config() -> None:
    registered: dict[str, Any] = {}
    config = Config.from_dict({"sandbox": {"docker": {"pool_size": 0, "memory": "128m"}}})
    sandbox_docker.agentkeel_register_sandboxes(register=registered.__setitem__, config=config)
    backend = registered["docker"]
    assert isinstance(backend, DockerBackend) and isinstance(backend, SandboxBackend)
    assert backend.settings.limits.memory == 128 * 1024**2
    assert not backend.client.connected  # nothing contacted Docker


async def test_a_docker_call_without_docker_says_what_to_do(no_docker: None) -> None:
    from agentkeel.tools.decorator import spec_of
    from agentkeel_pycode.plugin import run_python

    backend = DockerBackend()
    with pytest.raises(SandboxError, match=r"cannot reach the Docker engine.*agentkeel sandbox doctor"):
        await backend.run(ToolCall(spec_of(run_python), {"code": "print(1)"}, 5))
    await backend.aclose()


async def test_system_with_docker_tools_starts_and_fails_cleanly_without_docker(
    no_docker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "pycode")
    planner = ScriptedPlanner({"reasoning": "", "steps": [
        {"description": "run", "tool_name": "run_python", "tool_args": {"code": "print(1)"}}]})
    system = make_system(planner, principals={"agent": ["code"]}, load_entrypoints=True)
    assert isinstance(system.sandboxes["docker"], DockerBackend)
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="agent"))
    assert response.status is not RunStatus.SUCCEEDED
    assert response.steps[0].status is StepStatus.FAILED
    assert "Docker engine" in (response.steps[0].error or "")


@tool(idempotent=True, permissions=["sandbox-test"])
def echo(text: str) -> str:
    """An in-process tool: a request that uses only it needs no Docker."""
    return text


class EchoPlugin:
    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(echo)


def docker_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("agentkeel.sandbox.docker")
            and r.levelno >= logging.WARNING]


async def test_a_request_without_docker_tools_does_not_touch_docker(
    no_docker: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "pycode")  # a docker tool is registered, but not used
    planner = ScriptedPlanner({"reasoning": "", "steps": [
        {"description": "echo", "tool_name": "echo", "tool_args": {"text": "hi"}}]})
    system = make_system(EchoPlugin(), planner, principals={"agent": ["code", "sandbox-test"]},
                         load_entrypoints=True)
    assert system.tools["run_python"].isolation == "docker"
    backend = system.sandboxes["docker"]
    assert isinstance(backend, DockerBackend)
    with caplog.at_level(logging.DEBUG):
        async with system:
            response = await system.run(AgentRequest(message="go", user_id="agent"))
    assert response.status is RunStatus.SUCCEEDED
    assert docker_records(caplog) == []
    assert not backend.client.connected


async def test_a_needed_docker_tool_without_docker_warns_once_in_one_line(
    no_docker: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AGENTKEEL_LOAD_PLUGINS", "pycode")
    step = {"description": "run", "tool_name": "run_python", "tool_args": {"code": "print(1)"}}
    planner = ScriptedPlanner({"reasoning": "", "steps": [step, dict(step, description="again")]})
    system = make_system(planner, principals={"agent": ["code"]}, load_entrypoints=True)
    with caplog.at_level(logging.WARNING):
        async with system:
            response = await system.run(AgentRequest(message="go", user_id="agent"))
    assert response.status is not RunStatus.SUCCEEDED
    records = docker_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    message = records[0].getMessage()
    assert "\n" not in message and len(message) <= 160, message
    assert "Docker engine" in message and "agentkeel sandbox doctor" in message


def test_cli_run_without_docker_tools_prints_no_docker_warning(tmp_path: Any) -> None:
    """`agentkeel run` of the demo with the engine away: no word about Docker on stderr."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock", "AGENTKEEL_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "agentkeel", "run", "where is order 1001", "--user", "demo"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "docker" not in proc.stderr.lower(), proc.stderr


def test_the_plugin_only_registers_the_backend() -> None:
    """No lifecycle hooks and no module state: each system's backend starts lazily and the host closes it."""
    assert not hasattr(sandbox_docker, "agentkeel_startup")
    assert not hasattr(sandbox_docker, "agentkeel_shutdown")
    state = {name: value for name, value in vars(sandbox_docker).items()
             if isinstance(value, (dict, list, set)) and not name.startswith("__")}
    assert state == {}
    first: dict[str, Any] = {}
    second: dict[str, Any] = {}
    config = Config.from_dict({})
    sandbox_docker.agentkeel_register_sandboxes(register=first.__setitem__, config=config)
    sandbox_docker.agentkeel_register_sandboxes(register=second.__setitem__, config=config)
    assert first["docker"] is not second["docker"]
