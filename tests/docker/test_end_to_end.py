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
