"""The docker backend against a real engine: tools, run_python, hardening, pool, sweep."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from agentkeel.errors import SandboxError, ToolError
from agentkeel.sandbox.docker import DockerBackend, DockerSettings
from agentkeel.sandbox.docker.labels import LABEL_OWNER, LABEL_SANDBOX, container_labels
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.tools.decorator import spec_of

pytestmark = pytest.mark.docker


@pytest.fixture
def backend() -> Iterator[DockerBackend]:
    instance = DockerBackend(DockerSettings(pool_size=1))
    yield instance
    asyncio.run(instance.aclose())


def pycode_spec() -> Any:
    from agentkeel_pycode.plugin import run_python

    return attrs.evolve(spec_of(run_python), plugin="pycode")


async def test_run_python_through_the_backend(backend: DockerBackend, pycode_image: str) -> None:
    spec = pycode_spec()
    assert backend.image_for(spec) == pycode_image
    result = await backend.run(ToolCall(spec, {"code": "import sys\nprint(6 * 7)\nsys.exit(3)"}, 20))
    assert result["stdout"] == "42\n"
    assert result["exit_code"] == 3
    assert result["duration_s"] >= 0
    failing = await backend.run(ToolCall(spec, {"code": "1/0"}, 20))
    assert failing["exit_code"] == 1 and "ZeroDivisionError" in failing["stderr"]


async def test_docker_tool_runs_as_non_root_with_an_empty_environment(
    backend: DockerBackend, abuse_specs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-host-only")
    info = await backend.run(ToolCall(abuse_specs["sandbox_info"], {}, 20))
    assert info["uid"] == 10001 and info["gid"] == 10001
    assert info["cwd"] == "/work"
    assert "OPENAI_API_KEY" not in info["env"]
    assert info["hostname"] != socket.gethostname()
    assert await backend.run(ToolCall(abuse_specs["async_add"], {"a": 20, "b": 22}, 20)) == 42


async def test_no_state_passes_between_calls(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    first = await backend.run(ToolCall(abuse_specs["sandbox_info"], {"marker": "left-behind"}, 20))
    second = await backend.run(ToolCall(abuse_specs["sandbox_info"], {}, 20))
    assert first["hostname"] != second["hostname"]
    assert "left-behind" not in second["work_before"]


async def test_tool_exception_carries_the_traceback(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await backend.run(ToolCall(abuse_specs["raises"], {}, 20))
    assert "ValueError: tool failed on purpose" in str(info.value)
    assert "agentkeel_abuse_tools.py" in str(info.value)


@pytest.mark.parametrize("name", ["refuses", "refuses_custom", "refuses_async"])
async def test_a_refusal_in_the_container_stays_not_retryable(
    backend: DockerBackend, abuse_specs: dict[str, Any], name: str
) -> None:
    """ToolError(retryable=False), or any exception with retryable = False, raised in the container."""
    with pytest.raises(ToolError) as info:
        await backend.run(ToolCall(abuse_specs[name], {}, 20))
    assert info.value.retryable is False
    assert f"tool {name!r} raised " in str(info.value)
    with pytest.raises(ToolError) as plain:
        await backend.run(ToolCall(abuse_specs["raises"], {}, 20))
    assert plain.value.retryable is True  # an ordinary exception may be transient


async def test_warm_pool_fills_and_hands_out_each_container_once(
    backend: DockerBackend, abuse_specs: dict[str, Any]
) -> None:
    image = abuse_specs["sandbox_info"].image
    assert await backend.prewarm(image)
    idle_before = backend.pool.idle_ids()
    assert len(idle_before) == 1
    info = await backend.run(ToolCall(abuse_specs["sandbox_info"], {}, 20))
    assert info["hostname"] == next(iter(idle_before))[:12]  # the warm container answered
    await asyncio.to_thread(backend.pool.wait_ready, image, 30)
    assert backend.pool.idle_ids().isdisjoint(idle_before)  # refilled with a new one
    assert backend.pool_state()[image]["idle"] == 1


async def test_hardened_host_config(backend: DockerBackend, docker_api: Any, abuse_specs: dict[str, Any]) -> None:
    image = abuse_specs["sandbox_info"].image
    assert await backend.prewarm(image)
    cid = next(iter(backend.pool.idle_ids()))
    details = docker_api.inspect_container(cid)
    host = details["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["PidsLimit"] == backend.settings.limits.pids_limit
    assert host["Memory"] == host["MemorySwap"] == backend.settings.limits.memory
    assert host["NanoCpus"] == int(backend.settings.limits.cpus * 1e9)
    # No init process: the runner is PID 1 (non-dumpable), so nothing else in the container holds
    # the stdout the reply is read from (test_abuse checks PID 1 from inside).
    assert host["Init"] is False
    assert host["LogConfig"]["Config"]["max-size"] == "1m"
    assert all("noexec" in opts for opts in host["Tmpfs"].values())
    assert details["Config"]["User"] == "10001:10001"
    assert details["Config"]["Labels"][LABEL_SANDBOX] == "1"


async def test_a_tool_can_tighten_its_limits(docker_api: Any, pycode_image: str) -> None:
    settings = DockerSettings.from_config({"pool_size": 0, "tools": {"run_python": {"memory": "96m"}}})
    backend = DockerBackend(settings)
    try:
        code = "print(open('/sys/fs/cgroup/memory/memory.limit_in_bytes').read().strip())"
        result = await backend.run(ToolCall(pycode_spec(), {"code": code}, 20))
    finally:
        await backend.aclose()
    if result["exit_code"] == 0:  # cgroup v1 layout; v2 shows memory.max instead
        assert int(result["stdout"]) == 96 * 1024 * 1024


async def test_missing_image_says_how_to_build_it(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    spec = attrs.evolve(abuse_specs["sandbox_info"], image=None, plugin="not-installed-plugin")
    spec = attrs.evolve(spec, image="agentkeel/plugin-nothere:0.0.0")
    with pytest.raises(SandboxError) as info:
        await backend.run(ToolCall(spec, {}, 20))
    assert "agentkeel sandbox build nothere" in str(info.value)


async def test_orphans_of_dead_processes_are_swept_by_the_first_call(
    docker_api: Any, abuse_specs: dict[str, Any]
) -> None:
    image = abuse_specs["sandbox_info"].image
    dead_owner = f"{socket.gethostname()}:999999999:1"
    orphan = docker_api.create_container(
        image, labels=container_labels(dead_owner, image, pooled=True), stdin_open=True,
        host_config=docker_api.create_host_config(network_mode="none"),
    )
    docker_api.start(orphan["Id"])
    other_host = docker_api.create_container(
        image, labels={LABEL_SANDBOX: "1", LABEL_OWNER: "some-other-host:1:1"},
        host_config=docker_api.create_host_config(network_mode="none"),
    )
    backend = DockerBackend(DockerSettings(pool_size=0))
    try:
        assert not backend.started
        await backend.run(ToolCall(abuse_specs["async_add"], {"a": 1, "b": 1}, 20))
        assert backend.started
        ids = {c["Id"] for c in docker_api.containers(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})}
        assert orphan["Id"] not in ids
        assert other_host["Id"] in ids  # not ours to judge
    finally:
        docker_api.remove_container(other_host["Id"], force=True)
        await backend.aclose()


async def test_closing_one_backend_leaves_another_systems_containers_alone(
    abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    """Two systems in one process: each backend removes only its own containers."""
    image = abuse_specs["sandbox_info"].image
    first, second = DockerBackend(DockerSettings(pool_size=1)), DockerBackend(DockerSettings(pool_size=1))
    try:
        assert await first.prewarm(image) and await second.prewarm(image)
        kept = first.pool.idle_ids()
        await second.aclose()
        running = {c["Id"] for c in running_containers(first.owner)}
        assert kept <= running
        assert await first.run(ToolCall(abuse_specs["async_add"], {"a": 2, "b": 3}, 20)) == 5
    finally:
        await second.aclose()
        await first.aclose()


async def test_a_pooled_container_that_died_is_skipped(
    backend: DockerBackend, docker_api: Any, abuse_specs: dict[str, Any]
) -> None:
    image = abuse_specs["sandbox_info"].image
    assert await backend.prewarm(image)
    dead = next(iter(backend.pool.idle_ids()))
    docker_api.kill(dead)
    docker_api.wait(dead, timeout=10)
    info = await backend.run(ToolCall(abuse_specs["sandbox_info"], {}, 20))
    assert info["hostname"] != dead[:12]


async def test_an_image_built_for_another_runner_protocol_is_refused_with_rebuild_advice(
    docker_api: Any, abuse_specs: dict[str, Any], tmp_path: Any
) -> None:
    from agentkeel.sandbox.docker.build import docker_build
    from agentkeel.sandbox.docker.images import SANDBOX_IMAGE

    (tmp_path / "Dockerfile").write_text(f"FROM {SANDBOX_IMAGE}\n")
    tag = "agentkeel/sandbox-python:test-protocol-2"
    docker_build(docker_api, tmp_path, [tag], {}, {"io.agentkeel.protocol": "2"}, lambda _t: None)
    backend = DockerBackend(DockerSettings(pool_size=0))
    try:
        with pytest.raises(SandboxError, match=r"built for runner protocol 2.*rebuild it with `agentkeel sandbox"):
            await backend.run(ToolCall(attrs.evolve(abuse_specs["async_add"], image=tag), {"a": 1, "b": 2}, 20))
    finally:
        await backend.aclose()
        docker_api.remove_image(tag, force=True)


async def test_the_runner_refuses_to_serve_under_an_init_process(
    abuse_specs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, running_containers: Any
) -> None:
    """With docker's init (tini) as PID 1, tini would hold the container's stdout: the runner
    refuses, before starting its worker, and the call fails saying why."""
    from agentkeel.sandbox.docker import container as container_module
    from agentkeel.sandbox.docker.settings import host_config_kwargs

    monkeypatch.setattr(container_module, "host_config_kwargs",
                        lambda settings, limits: {**host_config_kwargs(settings, limits), "init": True})
    backend = DockerBackend(DockerSettings(pool_size=0))
    try:
        with pytest.raises(SandboxError, match=r"refused to serve \(exit code 70\): the runner is PID \d+, not the "
                                               r"container's PID 1"):
            await backend.run(ToolCall(abuse_specs["async_add"], {"a": 1, "b": 2}, 20))
    finally:
        await backend.aclose()
    assert running_containers(backend.owner) == []
