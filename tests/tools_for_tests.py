"""Throwaway tools for the sandbox tests. Module level, so a sandbox child can import them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agentkeel import ToolError, tool

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


@tool(isolation="subprocess")
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool(isolation="subprocess")
async def async_mul(a: int, b: int) -> dict[str, Any]:
    """Multiply after yielding to the event loop; reports that it ran on one."""
    await asyncio.sleep(0)
    return {"product": a * b, "loop": asyncio.get_running_loop() is not None}


@tool(isolation="subprocess")
def noop() -> None:
    """Do nothing (for measuring per-call overhead)."""


@tool(isolation="subprocess")
def echo_key(value: str, idempotency_key: str) -> dict[str, str]:
    """Return the value with the idempotency key the runtime passed."""
    return {"value": value, "key": idempotency_key}


@tool(isolation="subprocess")
def whoami() -> dict[str, int]:
    """The child's pid, process group and session."""
    return {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "ppid": os.getppid()}


@tool(isolation="subprocess")
def spin_with_grandchild(pid_file: str) -> None:
    """Spawn a sleeping grandchild, record both pids, then spin forever."""
    grandchild = subprocess.Popen(SLEEPER)
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    while True:
        pass


@tool(isolation="subprocess")
def sleep_with_grandchild(pid_file: str) -> None:
    """Like spin_with_grandchild, but blocked in sleep instead of burning CPU."""
    grandchild = subprocess.Popen(SLEEPER)
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(120)


@tool(isolation="subprocess")
def leave_grandchild(pid_file: str, hold_stderr: bool = False) -> str:
    """Start a background process and return at once, leaving it behind (holding stderr if asked)."""
    output = None if hold_stderr else subprocess.DEVNULL
    grandchild = subprocess.Popen(SLEEPER, stdout=output, stderr=output)
    Path(pid_file).write_text(str(grandchild.pid))
    return "done"


@tool(isolation="subprocess")
def spin() -> None:
    """Burn CPU forever."""
    while True:
        pass


@tool(isolation="subprocess")
def memory_bomb() -> int:
    """Allocate 16 MiB blocks until something gives."""
    blocks = []
    while True:
        blocks.append(bytearray(16 * 1024 * 1024))


@tool(isolation="subprocess")
def fail(message: str) -> None:
    """Raise ValueError(message)."""
    raise ValueError(message)


@tool(isolation="subprocess")
def fail_permanently() -> None:
    """Raise a ToolError that says retrying will not help."""
    raise ToolError("the record is gone", retryable=False)


@tool(isolation="subprocess")
def noisy() -> dict[str, str]:
    """Print to stdout every way there is, then return a value."""
    print("hello from print")
    sys.stdout.write('{"ok": false, "error": "fake"}\n')
    sys.stdout.flush()
    os.write(1, b"raw bytes on fd 1\n")
    subprocess.run(["echo", "from a grandchild"], check=True)
    print("to stderr", file=sys.stderr)
    return {"clean": "yes"}


@tool(isolation="subprocess")
def read_env(name: str) -> dict[str, Any]:
    """The value of one environment variable and the names of all of them."""
    return {"value": os.environ.get(name), "names": sorted(os.environ)}


@tool(isolation="subprocess")
def returns_set() -> Any:
    """Return something JSON cannot carry."""
    return {1, 2, 3}


@tool(isolation="subprocess")
def big_output(size: int) -> str:
    """Return a string of `size` characters."""
    return "x" * size


@tool(isolation="subprocess")
def hard_exit(code: int) -> None:
    """Exit the child without a result."""
    sys.stderr.write("about to exit hard\n")
    sys.stderr.flush()
    os._exit(code)


@tool(isolation="subprocess")
def open_many_files(count: int) -> int:
    """Open `count` file descriptors; returns how many were opened."""
    fds = []
    try:
        for _ in range(count):
            fds.append(os.open(os.devnull, os.O_RDONLY))
        return len(fds)
    finally:
        for fd in fds:
            os.close(fd)


@tool(isolation="subprocess")
def limits() -> dict[str, list[int]]:
    """The resource limits the child runs under."""
    import resource

    names = {"as": resource.RLIMIT_AS, "cpu": resource.RLIMIT_CPU, "nofile": resource.RLIMIT_NOFILE,
             "core": resource.RLIMIT_CORE}
    return {key: list(resource.getrlimit(which)) for key, which in names.items()}


@tool(isolation="subprocess")
def scribble(size: int) -> None:
    """Misbehave: write `size` bytes of garbage straight onto the result channel, then exit."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.stat(fd).st_mode & 0o170000 == 0o010000:  # a pipe: the result channel
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    os._exit(0)
