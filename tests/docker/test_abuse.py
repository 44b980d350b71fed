"""The abuse suite: hostile tools in real containers end contained, with a clear error.

Every test runs a tool from ``sandbox_testtools/agentkeel_abuse_tools.py``
through the docker backend with the default hardening, then checks the outcome
and, where it matters, that a following call still works (the host is fine).
The last test checks that no container of ours is left running.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agentkeel.errors import ToolError, ToolTimeoutError
from agentkeel.sandbox.docker import DockerBackend, DockerSettings
from agentkeel.sandbox.protocol import ToolCall

pytestmark = pytest.mark.docker

SETTINGS = DockerSettings(pool_size=1, grace_s=2.0)


@pytest.fixture(scope="module")
def backend() -> Iterator[DockerBackend]:
    instance = DockerBackend(SETTINGS)
    yield instance
    asyncio.run(instance.aclose())


async def busy_containers(backend: DockerBackend, running_containers: Any, wait_s: float = 10.0) -> list[str]:
    """Running containers of ``backend`` that are not idle in its pool, once they settle."""
    deadline = time.monotonic() + wait_s
    while True:
        idle = backend.pool.idle_ids()
        busy = [c["Id"] for c in running_containers(backend.owner) if c["Id"] not in idle]
        if not busy or time.monotonic() >= deadline:
            return busy
        await asyncio.sleep(0.1)


async def call(backend: DockerBackend, specs: dict[str, Any], name: str, timeout: float = 20.0, **args: Any) -> Any:
    return await backend.run(ToolCall(specs[name], args, timeout, run_id="abuse", step_id=1))


async def test_the_container_has_no_network_but_loopback(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    result = await call(backend, abuse_specs, "network_probe")
    # Isolation is checked by what the container has, never by sending traffic out.
    assert result["interfaces"] == "lo"
    assert result["ipv4_route_devices"] == []  # no route at all: nothing can leave, DNS included
    assert set(result["ipv6_route_devices"]) <= {"lo"}


async def test_fork_bomb_hits_the_pids_limit(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await call(backend, abuse_specs, "fork_bomb")
    assert "BlockingIOError" in str(info.value) or "Resource temporarily unavailable" in str(info.value)
    assert (await call(backend, abuse_specs, "async_add", a=1, b=2)) == 3


async def test_memory_bomb_is_reported_as_out_of_memory(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await call(backend, abuse_specs, "memory_bomb")
    assert "out of memory" in str(info.value)
    assert info.value.retryable is False


async def test_disk_fill_stops_at_the_tmpfs_size(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    result = await call(backend, abuse_specs, "disk_fill")
    assert result["errno"] == "ENOSPC"
    assert result["written"] <= SETTINGS.limits.tmpfs_size
    work = await call(backend, abuse_specs, "disk_fill", path="/work/fill")
    assert work["errno"] == "ENOSPC" and work["written"] <= SETTINGS.limits.tmpfs_size


async def test_writes_outside_the_tmpfs_fail(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    result = await call(backend, abuse_specs, "write_outside")
    for path, outcome in result.items():
        if path == "/dev/shm/x":
            continue  # private IPC namespace: a size-capped tmpfs of this container only
        assert outcome != "ok", path
        assert "Read-only file system" in outcome or "Permission denied" in outcome, (path, outcome)


async def test_binaries_written_to_tmp_cannot_run(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    result = await call(backend, abuse_specs, "exec_from_tmp")
    assert set(result) == {"/tmp", "/work"}
    for folder, outcome in result.items():
        assert outcome.startswith("PermissionError"), (folder, outcome)


async def test_host_environment_and_files_are_invisible(
    backend: DockerBackend, abuse_specs: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKEEL_TEST_SECRET", "sk-do-not-leak")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text("host secret")
    result = await call(backend, abuse_specs, "read_host",
                        paths=[str(secret_file), "/work/main", os.path.expanduser("~/.docker"), "/etc/shadow-host"])
    assert set(result["env"]) <= {"PATH", "HOME", "TMPDIR", "LANG"}
    assert not any("sk-do-not-leak" in item for item in result["pid1_env"])
    assert not any(item.startswith(("OPENAI", "AGENTKEEL")) for item in result["pid1_env"])
    assert not any(result["exists"].values())


async def test_docker_socket_is_unreachable(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    result = await call(backend, abuse_specs, "docker_socket")
    assert all(outcome != "ok" for outcome in result.values()), result
    assert result["/var/run/docker.sock"].startswith("FileNotFoundError")


async def test_infinite_loop_is_killed_at_the_deadline(
    backend: DockerBackend, abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    with pytest.raises(ToolTimeoutError) as info:
        await call(backend, abuse_specs, "infinite_loop", timeout=1.5)
    assert "deadline" in str(info.value) or "timeout" in str(info.value)
    assert await busy_containers(backend, running_containers) == []


async def test_host_enforces_the_deadline_when_the_runner_is_frozen(
    backend: DockerBackend, abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    with pytest.raises(ToolTimeoutError) as info:
        await call(backend, abuse_specs, "freeze_runner_then_spin", timeout=1.0)
    assert "container was killed" in str(info.value)
    assert await busy_containers(backend, running_containers) == []


async def test_endless_stdout_is_capped(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await call(backend, abuse_specs, "endless_stdout")
    assert "output exceeded" in str(info.value)
    assert len(str(info.value)) < 10_000  # the error carries a tail, not the flood


async def test_signalling_pid1_and_the_runner_changes_nothing(
    backend: DockerBackend, abuse_specs: dict[str, Any]
) -> None:
    result = await call(backend, abuse_specs, "signal_pid1")
    assert result["alive"] == "yes"
    assert (await call(backend, abuse_specs, "async_add", a=2, b=2)) == 4


async def test_non_json_result_is_rejected(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await call(backend, abuse_specs, "non_json")
    assert "not JSON" in str(info.value) and info.value.retryable is False


async def test_oversized_result_is_rejected(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as info:
        await call(backend, abuse_specs, "oversized")
    assert "more than the limit of" in str(info.value) and info.value.retryable is False


async def test_cancelling_the_call_kills_its_container(
    backend: DockerBackend, abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    task = asyncio.create_task(call(backend, abuse_specs, "infinite_loop", timeout=60))
    busy: list[str] = []
    for _ in range(100):
        await asyncio.sleep(0.1)
        busy = await busy_containers(backend, running_containers, wait_s=0)
        if busy or task.done():
            break
    assert busy and not task.done(), "the call never got a container"
    await asyncio.sleep(0.5)  # the tool is spinning now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await busy_containers(backend, running_containers) == []


async def test_zz_no_container_of_ours_is_left_running(backend: DockerBackend, running_containers: Any) -> None:
    await backend.aclose()
    assert running_containers(backend.owner) == []
