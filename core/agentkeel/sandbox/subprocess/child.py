"""The child-process runner of the "subprocess" sandbox: ``python -m agentkeel.sandbox.subprocess.child``.

Protocol (one call per process):

- argv[1] (optional): a JSON startup document, applied as soon as the child
  starts, while it waits for its request::

      {"limits": {"memory_mb": 512, "max_open_files": 256}, "preload": ["module", ...]}

- stdin: one JSON request, then EOF::

      {"tool": "module:qualname", "args": {...}, "deadline_s": 5.0,
       "limits": {"memory_mb": 512, "cpu_s": 6, "max_open_files": 256},
       "max_output_bytes": 1048576, "sys_path": [...]}

- stdout: the call's result envelope, written once at the end (see
  ``agentkeel.sandbox.envelope``, shared with the docker sandbox's runner)::

      {"ok": true, "value": ...}
      {"ok": false, "error": {"kind": "exception", "type": "ValueError", "message": "...",
                              "retryable": true, "traceback": "..."}}

Before any tool code runs (including the import of a tool's module) the child
applies the resource limits and points file descriptor 1 at stderr so that
``print`` in a tool cannot corrupt the result. ``cpu_s`` counts from the moment
the request arrives. An alarm a little past the deadline makes the child die on
its own if the host is gone. Preloading (importing the modules of tools the
host has called before) is best effort: a module that fails to import is
imported again, and its error reported, when a request names it. Empty stdin
(a prestarted child that was never used) exits quietly with status 0.

Besides the envelope module (standard library only) this imports nothing from
agentkeel, so the child stays independent of the host's state. The traceback
of a failure is also written to stderr, where the host's ``stderr_tail`` keeps it.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import resource
import signal
import sys
from collections.abc import Mapping
from typing import Any

from agentkeel.sandbox import envelope

ALARM_GRACE_S = 2
DEFAULT_MAX_OUTPUT_BYTES = envelope.DEFAULT_MAX_BYTES
NOT_FOUND_HINT = "; install the plugin in the same environment as the host"


def apply_limits(limits: Mapping[str, Any]) -> None:
    """Lower RLIMIT_AS, RLIMIT_CPU, RLIMIT_NOFILE and set RLIMIT_CORE to 0.

    Hard limits are lowered too, so tool code cannot raise them again. A limit
    is never raised above the hard limit the child inherited.
    """
    _set_limit(resource.RLIMIT_CORE, 0, 0)
    memory_mb = limits.get("memory_mb")
    if memory_mb:
        size = int(memory_mb) * 1024 * 1024
        _set_limit(resource.RLIMIT_AS, size, size)
    cpu_s = limits.get("cpu_s")
    if cpu_s:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)
        # Past the soft limit the kernel sends SIGXCPU (terminates), past the hard one SIGKILL.
        _set_limit(resource.RLIMIT_CPU, used + int(cpu_s), used + int(cpu_s) + 1)
    max_open_files = limits.get("max_open_files")
    if max_open_files:
        _set_limit(resource.RLIMIT_NOFILE, int(max_open_files), int(max_open_files))


def _set_limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _isolate_stdout() -> int:
    """Move the result channel off fd 1; tool output on fd 1 goes to stderr. Returns the channel."""
    result_fd = os.dup(1)  # not inheritable: grandchildren cannot write results
    os.dup2(2, 1)
    return result_fd


def _close_stdin() -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)


def preload(modules: list[str]) -> None:
    """Import ``modules`` ahead of the request; failures are left for the request to report."""
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - the request meets the same error and reports it
            pass


def run_request(raw: bytes) -> bytes:
    """Run one request and return its result envelope; never raises for tool failures."""
    try:
        request = json.loads(raw)
        if not isinstance(request, dict) or not isinstance(request.get("args", {}), dict):
            raise envelope.BadRequestError("the request must be a JSON object with an object 'args'")
        max_output_bytes = int(request.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES))
        apply_limits(request.get("limits", {}))
        deadline_s = request.get("deadline_s")
        if deadline_s:
            signal.alarm(math.ceil(float(deadline_s)) + ALARM_GRACE_S)
        if request.get("sys_path"):
            sys.path[:] = [str(p) for p in request["sys_path"]]
    except MemoryError:
        return envelope.OUT_OF_MEMORY_ENVELOPE
    except envelope.EnvelopeError as exc:
        return envelope.encode_exception(exc)
    except Exception as exc:  # noqa: BLE001 - a request this child cannot apply
        return envelope.dumps(envelope.failure(envelope.BAD_REQUEST, f"malformed request: {exc}"))
    return envelope.call_tool(str(request.get("tool", "")), request.get("args", {}), max_bytes=max_output_bytes,
                              not_found_hint=NOT_FOUND_HINT, stderr=sys.stderr)


def main() -> None:
    startup = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    result_fd = _isolate_stdout()
    apply_limits(startup.get("limits", {}))
    preload([str(name) for name in startup.get("preload", [])])
    raw = sys.stdin.buffer.read()
    if not raw.strip():
        os._exit(0)  # an unused prestarted child: the host is closing
    _close_stdin()
    payload = run_request(raw)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a broken stream must not lose the result
            pass
    _write_all(result_fd, payload)
    # Skip interpreter shutdown: stray non-daemon threads must not hold the result back.
    os._exit(0)


if __name__ == "__main__":
    main()
