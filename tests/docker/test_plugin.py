"""The sandbox_docker plugin loads and registers without Docker (no engine needed)."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import AgentRequest, Config, RunStatus, StepStatus
from agentkeel.sandbox.docker import plugin as sandbox_docker
from agentkeel.sandbox.docker import DockerBackend
from agentkeel.errors import SandboxError
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
    with pytest.raises(SandboxError, match="cannot reach the Docker engine.*agentkeel sandbox doctor"):
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
