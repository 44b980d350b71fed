"""``isolation = "docker"`` of agentkeel-mcp: the MCP test server runs inside the sandbox image in a
hardened container (read-only root, no capabilities, no network, user nobody) and its tools work
through the attach-socket transport. The image has Python but not the SDK: the SDK of this
interpreter is mounted read-only (same Python minor version required)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")
pytest.importorskip("agentkeel_mcp")

import mcp
from agentkeel import AgentRequest, RunStatus, StepStatus
from agentkeel.errors import PluginError
from agentkeel.sandbox.docker.images import SANDBOX_IMAGE
from agentkeel_mcp.config import parse
from agentkeel_mcp.docker_transport import LABEL, container_kwargs

from tests.plugins.mcp.helpers import SERVER, PlanSwitch, plan, step, system

pytestmark = pytest.mark.docker

SITE = str(Path(mcp.__file__).resolve().parent.parent)  # the site-packages holding mcp and its dependencies


def docker_server(**extra: Any) -> dict[str, Any]:
    return {
        "command": "python3",
        "args": ["/srv/mcp_test_server.py"],
        "env": {"MCP_TEST_STATE": "/tmp", "PYTHONPATH": "/opt/site", "MCP_TEST_SECRET": "only-this"},
        "isolation": "docker",
        "image": SANDBOX_IMAGE,
        "volumes": {SITE: "/opt/site", str(SERVER.parent): "/srv"},
        "permissions": ["box:use"],
        "startup_timeout_s": 60,
        **extra,
    }


@pytest.fixture(scope="module")
def image_python() -> str:
    import docker

    client = docker.from_env()
    try:
        out = client.containers.run(SANDBOX_IMAGE, entrypoint=["python3", "-c",
                                    "import sys; print('%d.%d' % sys.version_info[:2])"],
                                    network_mode="none", remove=True)
    finally:
        client.close()
    version = out.decode().strip()
    if version != "{}.{}".format(*sys.version_info[:2]):
        pytest.skip(f"the sandbox image has Python {version}; this interpreter's SDK cannot be mounted into it")
    return version


def running(name: str) -> list[Any]:
    import docker

    client = docker.from_env()
    try:
        return list(client.containers.list(all=True, filters={"label": f"{LABEL}={name}"}))
    finally:
        client.close()


@pytest.fixture
def box(image_python: str) -> Iterator[tuple[Any, PlanSwitch]]:
    planner = PlanSwitch()
    sys_ = system({"box": docker_server()}, planner, principals={"tester": {"permissions": ["box:use"]}})
    try:
        yield sys_, planner
    finally:
        sys_.close()


def test_the_container_is_hardened() -> None:
    (cfg,) = parse({"servers": {"box": docker_server(memory_mb=256, pids_limit=32)}})
    kwargs = container_kwargs(cfg)
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["network_mode"] == "none"
    assert kwargs["user"] == "65534:65534"
    assert (kwargs["mem_limit"], kwargs["pids_limit"]) == ("256m", 32)
    assert kwargs["stdin_open"] is True and kwargs["tty"] is False
    assert all(v["mode"] == "ro" for v in kwargs["volumes"].values())
    (networked,) = parse({"servers": {"box": docker_server(network=True)}})
    assert container_kwargs(networked)["network_mode"] == "bridge"


def test_tools_of_a_server_in_a_container(box: tuple[Any, PlanSwitch]) -> None:
    sys_, planner = box
    spec = sys_.tools["box.sandbox_facts"]
    assert spec.source == f"mcp stdio server 'box' in docker image {SANDBOX_IMAGE}: python3 /srv/mcp_test_server.py"
    assert spec.derived["idempotent"] == "readOnlyHint"
    planner.wire = plan(step("box.sandbox_facts"), step("box.stats", n=3), step("box.fail", reason="boxed"))
    response = sys_.run_sync(AgentRequest(message="go", user_id="tester"))
    facts, stats, failed = response.steps
    assert facts.status is StepStatus.SUCCEEDED, facts.error
    assert facts.result["uid"] == 65534 and facts.result["gid"] == 65534
    assert facts.result["root_writable"] is False
    assert facts.result["interfaces"] == ["lo"]  # network_mode "none"
    assert int(facts.result["cap_eff"], 16) == 0
    assert facts.result["env_secret"] == "only-this"
    assert stats.result == {"n": 3, "squares": [0, 1, 4]}
    assert failed.status is StepStatus.FAILED and "cannot do it: boxed" in (failed.error or "")
    assert len(running("box")) == 1


def test_a_crashed_container_is_replaced_on_the_next_call(box: tuple[Any, PlanSwitch]) -> None:
    sys_, planner = box
    planner.wire = plan(step("box.sandbox_facts"), step("box.crash"))
    first = sys_.run_sync(AgentRequest(message="go", user_id="tester"))
    assert first.steps[1].status is StepStatus.FAILED
    assert "was lost during the call" in (first.steps[1].error or "")
    planner.wire = plan(step("box.sandbox_facts"))
    second = sys_.run_sync(AgentRequest(message="go", user_id="tester"))
    assert second.status is RunStatus.SUCCEEDED, second.message
    assert len(running("box")) == 1  # the crashed one was removed


def test_containers_are_removed_when_the_system_closes(image_python: str) -> None:
    sys_ = system({"box": docker_server()})
    assert len(running("box")) == 1
    sys_.close()
    assert running("box") == []


def test_a_missing_image_is_a_start_up_error_naming_the_server(image_python: str) -> None:
    with pytest.raises(PluginError) as info:
        system({"box": docker_server(image="agentkeel/no-such-image:0")})
    message = str(info.value)
    assert "mcp server 'box'" in message and "'agentkeel/no-such-image:0' is not present" in message
