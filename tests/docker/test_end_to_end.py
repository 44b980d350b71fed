"""A request whose plan runs a docker-isolated tool and run_python, each in its own container."""

from __future__ import annotations

from typing import Any

import pytest
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl
from agentkeel.testing import ScriptedPlanner, make_system

pytestmark = pytest.mark.docker


class AbuseToolsPlugin:
    def __init__(self, specs: dict[str, Any]) -> None:
        self.specs = specs

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(self.specs["sandbox_info"])


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
    system = make_system(AbuseToolsPlugin(abuse_specs), planner, principals={"agent": ["code"]},
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
