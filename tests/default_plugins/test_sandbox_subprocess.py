"""The subprocess sandbox against real child processes: results, errors, limits, killing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hostile_subprocess_tools as hostile
import tools_for_tests as tools
from agentkeel import AgentRequest, RunStatus, StepStatus, hookimpl
from agentkeel.config import Config
from agentkeel.errors import ConfigError, ToolError, ToolTimeoutError
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
from agentkeel.sandbox.subprocess import backend as sandbox_subprocess
from agentkeel.sandbox.subprocess.backend import SubprocessBackend, SubprocessSettings
from agentkeel.testing import ScriptedPlanner, make_system
from agentkeel.tools.decorator import spec_of

# Generous: a loaded CI machine can take a second or more to start an interpreter.
SLOW_START_S = 20.0


def call(fn: Callable[..., Any], *, timeout: float = SLOW_START_S, **args: Any) -> ToolCall:
    spec = spec_of(fn)
    assert spec is not None
    return ToolCall(spec, args, timeout, run_id="run1", step_id=1)


def alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie waiting for its reaper counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (scans /proc; no psutil)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members


async def eventually_dead(*pids: int, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert not [pid for pid in pids if alive(pid)], "processes survived the sandbox"


async def wait_for_file(path: Path, within_s: float = SLOW_START_S) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} was never written: the tool did not start")


@pytest.fixture
async def backend() -> AsyncIterator[SubprocessBackend]:
    b = SubprocessBackend(SubprocessSettings(memory_mb=256, prestart=0))
    yield b
    await b.aclose()


async def test_runs_a_sync_tool(backend: SubprocessBackend) -> None:
    assert isinstance(backend, SandboxBackend)
    assert await backend.run(call(tools.add, a=2, b=40)) == 42


async def test_runs_an_async_tool(backend: SubprocessBackend) -> None:
    assert await backend.run(call(tools.async_mul, a=6, b=7)) == {"product": 42, "loop": True}


async def test_passes_the_idempotency_key(backend: SubprocessBackend) -> None:
    result = await backend.run(call(tools.echo_key, value="v", idempotency_key="run1:1"))
    assert result == {"value": "v", "key": "run1:1"}


async def test_concurrent_calls_each_get_their_own_child(backend: SubprocessBackend) -> None:
    results = await asyncio.gather(*(backend.run(call(tools.whoami)) for _ in range(4)))
    assert len({r["pid"] for r in results}) == 4
    assert await asyncio.gather(*(backend.run(call(tools.add, a=i, b=i)) for i in range(4))) == [0, 2, 4, 6]


def test_child_protocol_on_the_command_line() -> None:
    """The runner speaks the documented protocol by itself: one JSON in, one JSON out."""
    request = {"tool": "tools_for_tests:noisy", "args": {}, "sys_path": sys.path}
    done = subprocess.run(
        [sys.executable, "-m", "agentkeel.sandbox.subprocess.child"], input=json.dumps(request).encode(),
        capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"ok": True, "value": {"clean": "yes"}}
    assert b"hello from print" in done.stderr and b"from a grandchild" in done.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "agentkeel.sandbox.subprocess.child"], input=b'{"tool": "no_such_module:f"}',
        capture_output=True, timeout=60, check=False,
    )
    error = json.loads(bad.stdout)["error"]
    assert error["kind"] == "import" and "no_such_module" in error["message"] and not error["retryable"]
    assert set(error) == {"kind", "type", "message", "retryable", "traceback"}  # agentkeel.sandbox.envelope


async def test_child_has_its_own_session_and_limits(backend: SubprocessBackend) -> None:
    me = await backend.run(call(tools.whoami))
    assert me["pid"] != os.getpid() and me["ppid"] == os.getpid()
    assert me["pgid"] == me["pid"] == me["sid"]
    limits = await backend.run(call(tools.limits, timeout=4.5))
    assert limits["as"] == [256 * 1024 * 1024] * 2
    assert limits["nofile"] == [256, 256]
    assert limits["core"] == [0, 0]
    soft_cpu, hard_cpu = limits["cpu"]
    assert 6 <= soft_cpu <= 8 and hard_cpu == soft_cpu + 1  # ceil(4.5) + 1 after startup's CPU


async def test_timeout_kills_the_child_and_its_grandchild(backend: SubprocessBackend, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(ToolTimeoutError, match="timed out after 4s"):
        await backend.run(call(tools.spin_with_grandchild, timeout=4.0, pid_file=str(pid_file)))
    assert time.monotonic() - started < 4.0 + 3.0
    assert pid_file.exists(), "the tool never started within its timeout; the machine is overloaded"
    child, grandchild = (int(p) for p in pid_file.read_text().split())
    await eventually_dead(child, grandchild)
    assert group_members(child) == []


async def test_cancellation_kills_and_reaps_the_child(backend: SubprocessBackend, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    task = asyncio.create_task(backend.run(call(tools.sleep_with_grandchild, pid_file=str(pid_file))))
    child, grandchild = (int(p) for p in (await wait_for_file(pid_file)).split())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped: not even a zombie is left
    await eventually_dead(grandchild)
    assert group_members(child) == []


async def test_leftover_processes_are_killed_after_a_successful_call(
    backend: SubprocessBackend, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    assert await backend.run(call(tools.leave_grandchild, pid_file=str(pid_file))) == "done"
    await eventually_dead(int(pid_file.read_text()))


async def test_a_leftover_holding_stderr_does_not_hold_the_result_back(
    backend: SubprocessBackend, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    result = await backend.run(call(tools.leave_grandchild, timeout=60, pid_file=str(pid_file), hold_stderr=True))
    assert result == "done"  # well before the timeout: the leftover was killed, not waited for
    await eventually_dead(int(pid_file.read_text()))


async def test_memory_bomb_is_reported_as_out_of_memory(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match=r"ran out of memory.*256 MiB") as info:
        await backend.run(call(tools.memory_bomb))
    assert info.value.retryable is False
    assert not isinstance(info.value, ToolTimeoutError)


async def test_cpu_limit_stops_a_spinning_tool(tmp_path: Path) -> None:
    backend = SubprocessBackend(SubprocessSettings(cpu_s=1, prestart=0))
    try:
        with pytest.raises(ToolError, match="CPU time limit of 1s") as info:
            await backend.run(call(tools.spin, timeout=SLOW_START_S))
        assert not isinstance(info.value, ToolTimeoutError)
    finally:
        await backend.aclose()


async def test_open_file_limit_applies(tmp_path: Path) -> None:
    backend = SubprocessBackend(SubprocessSettings(max_open_files=32, prestart=0))
    try:
        assert await backend.run(call(tools.open_many_files, count=10)) == 10
        with pytest.raises(ToolError, match=r"OSError: .*Too many open files"):
            await backend.run(call(tools.open_many_files, count=64))
    finally:
        await backend.aclose()


async def test_tool_exception_becomes_tool_error_with_its_message(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match=r"tool 'fail' raised ValueError: card declined") as info:
        await backend.run(call(tools.fail, message="card declined"))
    assert info.value.retryable is True
    assert "Traceback" in info.value.stderr_tail  # type: ignore[attr-defined]


async def test_tool_error_keeps_its_retryable_flag(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match="the record is gone") as info:
        await backend.run(call(tools.fail_permanently))
    assert info.value.retryable is False


async def test_prints_do_not_corrupt_the_result(backend: SubprocessBackend) -> None:
    assert await backend.run(call(tools.noisy)) == {"clean": "yes"}


async def test_printed_output_is_kept_in_the_stderr_tail() -> None:
    backend = SubprocessBackend(SubprocessSettings(stderr_tail_bytes=64, prestart=0))
    try:
        with pytest.raises(ToolError, match="status 3") as info:
            await backend.run(call(tools.hard_exit, code=3))
        assert "about to exit hard" in str(info.value)
        assert info.value.stderr_tail.endswith("about to exit hard")  # type: ignore[attr-defined]
        assert len(info.value.stderr_tail) <= 64  # type: ignore[attr-defined]
    finally:
        await backend.aclose()


async def test_secrets_in_the_environment_do_not_reach_the_child(
    backend: SubprocessBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("AGENTKEEL_SANDBOX_TEST_SECRET", "hunter2")
    seen = await backend.run(call(tools.read_env, name="OPENAI_API_KEY"))
    assert seen["value"] is None
    assert "AGENTKEEL_SANDBOX_TEST_SECRET" not in seen["names"]
    assert set(seen["names"]) <= set(sandbox_subprocess.BASE_ENV) | {"PYTHONPATH"}


async def test_pass_env_and_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANTED_BY_TOOL", "yes")
    settings = SubprocessSettings(pass_env=("WANTED_BY_TOOL",), env={"SET_BY_CONFIG": "1"}, prestart=0)
    backend = SubprocessBackend(settings)
    try:
        seen = await backend.run(call(tools.read_env, name="WANTED_BY_TOOL"))
        assert seen["value"] == "yes" and "SET_BY_CONFIG" in seen["names"]
    finally:
        await backend.aclose()


async def test_non_json_result_names_the_type(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match="returned a set, which is not JSON") as info:
        await backend.run(call(tools.returns_set))
    assert info.value.retryable is False


async def test_non_json_arguments_are_refused_before_starting(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match="arguments must be JSON"):
        await backend.run(call(tools.add, a={1, 2}, b=1))


async def test_oversized_result_is_refused() -> None:
    backend = SubprocessBackend(SubprocessSettings(max_output_bytes=10_000, prestart=0))
    try:
        assert len(await backend.run(call(tools.big_output, size=5_000))) == 5_000
        with pytest.raises(ToolError, match="more than the limit of 10000 bytes"):
            await backend.run(call(tools.big_output, size=20_000))
    finally:
        await backend.aclose()


async def test_host_caps_what_it_reads_from_the_result_channel() -> None:
    backend = SubprocessBackend(SubprocessSettings(max_output_bytes=10_000, prestart=0))
    try:
        with pytest.raises(ToolError, match="wrote more than 10000 bytes of result"):
            await backend.run(call(tools.scribble, size=50_000))
        with pytest.raises(ToolError, match=r"output that is not a result: .*not JSON.*'xxxxx"):
            await backend.run(call(tools.scribble, size=100))
    finally:
        await backend.aclose()


async def test_a_result_nested_100000_levels_deep_is_a_clean_tool_error(backend: SubprocessBackend) -> None:
    """Returned (the envelope refuses it in the child) or written onto the result channel by the
    tool itself (the host's bounded decode refuses it): never a RecursionError in the host."""
    with pytest.raises(ToolError, match="nested too deeply") as returned:
        await backend.run(call(hostile.returns_deep))
    assert returned.value.retryable is False
    for fn in (hostile.writes_deep, hostile.writes_deep_failure):
        with pytest.raises(ToolError, match="nested more than") as written:
            await backend.run(call(fn))
        assert written.value.retryable is False
    with pytest.raises(ToolError, match=r"value\.0\.0.*nested more than"):
        await backend.run(call(hostile.writes_deep, depth=200))
    assert await backend.run(call(hostile.returns_deep, depth=20)) == json.loads("[" * 20 + "0" + "]" * 20)


async def test_a_nan_is_refused_naming_the_field(backend: SubprocessBackend) -> None:
    with pytest.raises(ToolError, match=r"value\.score: NaN is not a JSON number") as returned:
        await backend.run(call(hostile.returns_nan))
    assert returned.value.retryable is False
    with pytest.raises(ToolError, match=r"value\.score: NaN is not a JSON number") as written:
        await backend.run(call(hostile.writes_nan))
    assert written.value.retryable is False
    assert await backend.run(call(hostile.returns_floats)) == {"score": 0.25, "big": 1e300}


class HostilePlugin:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    @hookimpl
    def agentkeel_register_tools(self, register: Any) -> None:
        register(self.fn)


@pytest.mark.parametrize("fn", [hostile.writes_deep, hostile.writes_nan, hostile.returns_deep, hostile.returns_nan],
                         ids=lambda fn: fn.__name__)
async def test_a_hostile_result_fails_the_step_and_the_run_ends(fn: Callable[..., Any]) -> None:
    spec = spec_of(fn)
    assert spec is not None
    planner = ScriptedPlanner({"reasoning": "", "steps": [{"description": "attack", "tool_name": spec.name,
                                                            "tool_args": {}}]})
    system = make_system(HostilePlugin(fn), planner, principals={"tester": ["sandbox-test"]},
                         config={"sandbox": {"subprocess": {"prestart": 0}}})
    async with system:
        response = await system.run(AgentRequest(message="go", user_id="tester"))
        assert response.status is RunStatus.FAILED, response.to_dict()
        step = response.steps[0]
        assert step.status is StepStatus.FAILED and step.attempts == 1, step
        assert step.error and ("nested" in step.error or "NaN" in step.error), step.error
        assert system.show(response.run_id).status is RunStatus.FAILED


async def test_read_capped_stops_past_the_cap() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 100)
    reader.feed_eof()
    assert await sandbox_subprocess._read_capped(reader, 99) == (b"", True)
    reader = asyncio.StreamReader()
    reader.feed_data(b"x" * 100)
    reader.feed_eof()
    assert await sandbox_subprocess._read_capped(reader, 100) == (b"x" * 100, False)


async def test_tool_defined_in_a_function_is_refused(backend: SubprocessBackend) -> None:
    from agentkeel import tool

    @tool(isolation="subprocess")
    def local() -> int:
        return 1

    with pytest.raises(ToolError, match="define it at module level"):
        await backend.run(call(local))


async def test_crash_by_signal_is_reported(backend: SubprocessBackend, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    task = asyncio.create_task(backend.run(call(tools.sleep_with_grandchild, pid_file=str(pid_file))))
    child, _ = (int(p) for p in (await wait_for_file(pid_file)).split())
    os.kill(child, 9)
    with pytest.raises(ToolError, match="died from signal SIGKILL"):
        await task


async def test_prestarted_child_is_used_and_aclose_kills_spares() -> None:
    backend = SubprocessBackend(SubprocessSettings(prestart=1))
    try:
        first = await backend.run(call(tools.whoami))
        for _ in range(200):
            if backend._spares:
                break
            await asyncio.sleep(0.05)
        assert backend._spares, "no spare child was started"
        spare_pid = backend._spares[0].proc.pid
        second = await backend.run(call(tools.whoami))
        assert second["pid"] == spare_pid != first["pid"]
        for _ in range(200):
            if backend._spares:
                break
            await asyncio.sleep(0.05)
        spares = [child.proc.pid for child in backend._spares]
    finally:
        await backend.aclose()
    assert spares and not any(alive(pid) for pid in spares)
    assert backend._spares == []


def test_settings_from_config() -> None:
    config = Config.from_dict(
        {"sandbox": {"subprocess": {"memory_mb": 128, "cpu_s": 3, "pass_env": ["X"], "prestart": 0}}}
    )
    backend = SubprocessBackend.from_config(config)
    assert backend.settings.memory_mb == 128 and backend.settings.cpu_limit(100.0) == 3
    assert backend.settings.pass_env == ("X",) and backend.settings.prestart == 0
    assert SubprocessBackend.from_config(Config.from_dict({})).settings.cpu_limit(2.5) == 4
    with pytest.raises(ConfigError, match=r"sandbox\.subprocess\.memory_mb"):
        SubprocessSettings.from_mapping({"memory_mb": "lots"})
    with pytest.raises(ConfigError, match=r"sandbox\.subprocess\.colour: unknown setting"):
        SubprocessSettings.from_mapping({"colour": "red"})


def test_plugin_registers_the_subprocess_backend() -> None:
    registered: dict[str, object] = {}
    sandbox_subprocess.agentkeel_register_sandboxes(
        register=lambda name, b: registered.setdefault(name, b), config=Config.from_dict({})
    )
    assert isinstance(registered["subprocess"], SubprocessBackend)
