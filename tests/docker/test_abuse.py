"""The abuse suite: hostile tools in real containers end contained, with a clear error.

Every test runs a tool from ``sandbox_testtools/agentkeel_abuse_tools.py`` (or
a ``code`` request, as the doctor sends) through the docker backend with the
default hardening, then checks the outcome and, where it matters, that a
following call still works (the host is fine). The reply-channel tests try to
forge the runner's reply: through PID 1's descriptors, ptrace, the worker's
result pipe, signals to PID 1, and replies the host must not choke on (nested
100,000 levels deep, NaN). The last test checks that no container of ours is
left running.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from agentkeel.errors import SandboxError, ToolError, ToolTimeoutError
from agentkeel.sandbox.docker import DockerBackend, DockerSettings
from agentkeel.sandbox.protocol import ToolCall
from agentkeel.tools.decorator import spec_of

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


async def test_the_runner_cannot_be_stopped_or_killed_so_its_deadline_holds(
    backend: DockerBackend, abuse_specs: dict[str, Any], running_containers: Any
) -> None:
    """SIGSTOP/SIGKILL to PID 1 (the runner) from inside its pid namespace are dropped."""
    with pytest.raises(ToolTimeoutError) as info:
        await call(backend, abuse_specs, "freeze_runner_then_spin", timeout=1.5)
    assert "stopped at the deadline of 1.5s" in str(info.value)  # the runner's own answer, not the host's
    assert await busy_containers(backend, running_containers) == []


async def test_host_enforces_the_deadline_when_the_runner_is_frozen(
    backend: DockerBackend, abuse_specs: dict[str, Any], running_containers: Any, docker_api: Any
) -> None:
    """Nothing inside can freeze the runner now, so the host freezes the container (cgroup freezer)."""
    task = asyncio.create_task(call(backend, abuse_specs, "sleep_then_answer", timeout=1.0, seconds=30.0))
    busy: list[str] = []
    for _ in range(100):
        busy = await busy_containers(backend, running_containers, wait_s=0)
        if busy or task.done():
            break
        await asyncio.sleep(0.05)
    assert busy and not task.done(), "the call never got a container"
    await asyncio.to_thread(docker_api.pause, busy[0])
    with pytest.raises(ToolTimeoutError) as info:
        await task
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


# --- the reply channel -------------------------------------------------------------------


@pytest.mark.parametrize("deep", [False, True], ids=["forged-line", "100000-deep-line"])
async def test_a_tool_cannot_write_to_the_hosts_reply_channel(
    backend: DockerBackend, abuse_specs: dict[str, Any], deep: bool
) -> None:
    """/proc/1/fd/1 is the container's stdout (the attach stream the host reads the reply from)."""
    result = await call(backend, abuse_specs, "forge_reply_via_pid1", deep=deep)
    assert set(result) == {"/proc/1/fd/1", "/proc/1/fd/2"}, result  # the real result, not the forged one
    assert all(outcome.startswith("PermissionError") for outcome in result.values()), result


async def test_ptrace_of_pid1_is_refused(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    assert await call(backend, abuse_specs, "ptrace_pid1") == {"1": "EPERM"}


async def test_the_runner_is_pid1_and_non_dumpable(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    """PID 1 runs as our uid, yet its descriptors, memory and environment are closed to us."""
    result = await call(backend, abuse_specs, "read_pid1")
    assert result["cmdline"].endswith("/opt/agentkeel/runner.py"), result
    assert result["uid"] == result["my_uid"] == "10001"
    for path in ("/proc/1/fd/0", "/proc/1/fd/1", "/proc/1/mem", "/proc/1/environ", "/proc/1/fd"):
        assert result[path].startswith("PermissionError"), (path, result[path])


FORGED_FAILURE = (b'{"ok":false,"error":{"kind":"timeout","type":"","message":"forged","retryable":false,'
                  b'"traceback":""}}\n')


async def test_code_cannot_forge_its_outcome_on_any_descriptor(backend: DockerBackend, tools_image: str) -> None:
    """A code run's outcome is its exit status and streams: its result pipe is closed before it runs
    and ignored, PID 1's descriptors are closed to it."""
    code = f"""
import os
forged = {FORGED_FAILURE!r}
for name in os.listdir("/proc/self/fd"):
    try:
        os.write(int(name), forged)
    except OSError:
        pass
for path in ("/proc/1/fd/1", "/proc/1/fd/2"):
    try:
        fd = os.open(path, os.O_WRONLY)
        os.write(fd, forged)
        print(path, "written")
    except OSError as exc:
        print(path, type(exc).__name__)
"""
    result = await backend.run_code(code, timeout=20, image=tools_image)
    assert result["exit_code"] == 0, result
    assert "/proc/1/fd/1 PermissionError" in result["stdout"]
    assert "/proc/1/fd/2 PermissionError" in result["stdout"]
    assert "forged" in result["stderr"]  # what it wrote on its own streams is just output


async def test_code_cannot_ptrace_or_read_pid1(backend: DockerBackend, tools_image: str) -> None:
    code = "import json, agentkeel_abuse_tools as t\nprint(json.dumps([t.ptrace_pid1(), t.read_pid1()]))"
    result = await backend.run_code(code, timeout=20, image=tools_image)
    assert result["exit_code"] == 0, result
    traced, read = json.loads(result["stdout"])
    assert traced == {"1": "EPERM"}  # for code, the runner is its parent too
    assert all(read[p].startswith("PermissionError") for p in ("/proc/1/fd/0", "/proc/1/mem", "/proc/1/environ"))


async def test_code_cannot_stop_or_kill_pid1(backend: DockerBackend, tools_image: str) -> None:
    code = """
import os, signal, time
for pid in sorted({1, os.getppid()}):
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        os.kill(pid, sig)
time.sleep(0.5)
print("still answered")
"""
    started = time.monotonic()
    result = await backend.run_code(code, timeout=10, image=tools_image)
    assert result["exit_code"] == 0 and result["stdout"].strip() == "still answered", result
    assert time.monotonic() - started < 10


async def test_code_run_by_a_tool_cannot_forge_the_tools_result(
    backend: DockerBackend, abuse_specs: dict[str, Any]
) -> None:
    """run_python's code is a child of the worker: it cannot write to the worker's result pipe
    (the worker is non-dumpable too), nor kill its way to a forged result."""
    from agentkeel_pycode.plugin import run_python

    spec = spec_of(run_python)
    assert spec is not None
    spec = attrs.evolve(spec, image=abuse_specs["sandbox_info"].image)
    code = f"""
import os, signal
forged = {FORGED_FAILURE!r}
parent = os.getppid()
try:
    names = os.listdir(f"/proc/{{parent}}/fd")
except OSError as exc:
    names = []
    print("listdir", type(exc).__name__)
for name in names:
    try:
        fd = os.open(f"/proc/{{parent}}/fd/{{name}}", os.O_WRONLY)
        os.write(fd, forged)
    except OSError:
        pass
for fd in range(3, 64):
    try:
        os.write(fd, forged)
    except OSError:
        pass
print("done")
"""
    result = await backend.run(ToolCall(spec, {"code": code}, 20))
    assert result["exit_code"] == 0, result
    assert result["stdout"].split() == ["listdir", "PermissionError", "done"], result


async def test_a_result_nested_100000_levels_deep_is_refused(
    backend: DockerBackend, abuse_specs: dict[str, Any]
) -> None:
    with pytest.raises(ToolError) as returned:
        await call(backend, abuse_specs, "returns_deep")
    assert "nested too deeply" in str(returned.value) and returned.value.retryable is False
    with pytest.raises(ToolError) as written:
        await call(backend, abuse_specs, "writes_result", kind="deep")
    assert "nested too deeply" in str(written.value) and written.value.retryable is False
    assert not isinstance(written.value, SandboxError)
    with pytest.raises(ToolError) as deep_200:  # readable by the runner, refused by the host
        await call(backend, abuse_specs, "writes_result", kind="deep_200")
    assert "nested more than" in str(deep_200.value) and "value.0.0" in str(deep_200.value)
    assert (await call(backend, abuse_specs, "returns_deep", depth=10)) == json.loads("[" * 10 + "0" + "]" * 10)


async def test_a_nan_is_refused_naming_the_field(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    with pytest.raises(ToolError) as returned:
        await call(backend, abuse_specs, "returns_nan")
    assert "value.score: NaN is not a JSON number" in str(returned.value), returned.value
    with pytest.raises(ToolError) as written:  # forwarded by the runner, judged by the host
        await call(backend, abuse_specs, "writes_result", kind="nan")
    assert "value.score: NaN is not a JSON number" in str(written.value), written.value
    assert written.value.retryable is False
    assert await call(backend, abuse_specs, "returns_float") == {"score": 0.25, "big": 1e300, "small": -2.5e-300}


async def test_orphans_are_reaped_by_the_runner(backend: DockerBackend, abuse_specs: dict[str, Any]) -> None:
    """400 orphans through a pids limit of 128: only a PID 1 that reaps them lets the tool finish."""
    assert SETTINGS.limits.pids_limit < 400
    zombies = await call(backend, abuse_specs, "orphan_storm", timeout=60)
    assert zombies < 10


async def test_zz_no_container_of_ours_is_left_running(backend: DockerBackend, running_containers: Any) -> None:
    await backend.aclose()
    assert running_containers(backend.owner) == []
