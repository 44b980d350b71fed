"""The ``run_python`` tool and its registration hook.

The tool body runs *inside* the sandbox container (its plugin image): it starts
a fresh interpreter for the code, captures stdout and stderr (each capped at
``OUTPUT_LIMIT`` bytes; past that the code is stopped and the output marked as
truncated) and reports the exit code and duration. The container's own limits
(deadline, memory, processes, no network, read-only root) bound everything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from agentkeel import hookimpl, tool

OUTPUT_LIMIT = 32 * 1024
TRUNCATED = "\n[output truncated at {limit} bytes; the code was stopped]\n"

OUTPUT_SCHEMA = {
    "type": "object",
    "required": ["stdout", "stderr", "exit_code", "duration_s"],
    "properties": {
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "exit_code": {"type": "integer"},
        "duration_s": {"type": "number"},
    },
}


class _CappedReader(threading.Thread):
    def __init__(self, stream: IO[bytes], limit: int, on_overflow: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.stream, self.limit, self.on_overflow = stream, limit, on_overflow
        self.data = bytearray()
        self.truncated = False

    def run(self) -> None:
        while chunk := self.stream.read1(65536):  # type: ignore[attr-defined]
            room = self.limit - len(self.data)
            self.data += chunk[: max(room, 0)]
            if len(chunk) > room and not self.truncated:
                self.truncated = True
                self.on_overflow()

    def text(self) -> str:
        out = self.data.decode("utf-8", "replace")
        return out + TRUNCATED.format(limit=self.limit) if self.truncated else out


def run_source(code: str, limit: int = OUTPUT_LIMIT) -> dict[str, Any]:
    """Run ``code`` in a new interpreter; stdout, stderr, exit_code, duration_s."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-B", "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    readers = [_CappedReader(s, limit, proc.kill) for s in (proc.stdout, proc.stderr)]  # type: ignore[arg-type]
    for reader in readers:
        reader.start()
    exit_code = proc.wait()
    for reader in readers:
        reader.join()
    return {
        "stdout": readers[0].text(),
        "stderr": readers[1].text(),
        "exit_code": exit_code,
        "duration_s": round(time.monotonic() - started, 6),
    }


@tool(
    isolation="docker",
    idempotent=True,
    permissions=["code"],
    timeout=30.0,
    output_schema=OUTPUT_SCHEMA,
)
def run_python(code: str) -> dict[str, Any]:
    """Run Python 3 source code in an isolated sandbox (no network, no host files)
    and return its stdout, stderr, exit code and duration in seconds. Print what
    you want to see; the standard library is available."""
    return run_source(code)


@tool(
    permissions=["code"],
    idempotent=True,
    isolation="docker",
    timeout=10.0,
    output_schema={"type": "object", "required": ["uid", "hostname", "python", "network"]},
)
def describe_sandbox() -> dict[str, Any]:
    """Describe the sandbox a docker tool runs in: user id, host name, Python
    version and which network interfaces it sees."""
    import platform
    import socket

    return {
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "network": sorted(name for _, name in socket.if_nameindex()),
    }


@hookimpl
def agentkeel_register_tools(register: Callable[[Any], None]) -> None:
    register(run_python)
    register(describe_sandbox)


@hookimpl
def agentkeel_register_plan_templates(register: Callable[[Any], None]) -> None:
    from agentkeel import PlanTemplate

    register(PlanTemplate(
        name="pycode:run",
        pattern=r"run python:?\s+(?P<code>.+)",
        reasoning="run the given code in the sandbox",
        steps=[{"description": "run the code", "tool_name": "run_python", "tool_args": {"code": "{code}"}}],
    ))
    register(PlanTemplate(
        name="pycode:describe-and-run",
        pattern=r"describe the sandbox and run python:?\s+(?P<code>.+)",
        reasoning="inspect the sandbox, then run the code in a fresh one",
        steps=[
            {"description": "describe the sandbox", "tool_name": "describe_sandbox", "tool_args": {}},
            {"description": "run the code", "tool_name": "run_python", "tool_args": {"code": "{code}"}},
        ],
    ))
