"""The child-process runner of the "subprocess" sandbox: ``python -m agentkeel.sandbox.subprocess.child``.

Protocol (one call per process):

- argv[1] (optional): a JSON startup document, applied as soon as the child
  starts, while it waits for its request::

      {"limits": {"memory_mb": 512, "max_open_files": 256}, "preload": ["module", ...]}

- stdin: one JSON request, then EOF::

      {"tool": "module:qualname", "args": {...}, "deadline_s": 5.0,
       "limits": {"memory_mb": 512, "cpu_s": 6, "max_open_files": 256},
       "max_output_bytes": 1048576, "sys_path": [...]}

- stdout: one JSON result, written once at the end::

      {"ok": true, "value": ...}
      {"ok": false, "error": {"type": "ValueError", "message": "...", "retryable": true}}

Before any tool code runs (including the import of a tool's module) the child
applies the resource limits and points file descriptor 1 at stderr so that
``print`` in a tool cannot corrupt the result. ``cpu_s`` counts from the moment
the request arrives. An alarm a little past the deadline makes the child die on
its own if the host is gone. Preloading (importing the modules of tools the
host has called before) is best effort: a module that fails to import is
imported again, and its error reported, when a request names it. Empty stdin
(a prestarted child that was never used) exits quietly with status 0.

This module imports nothing from agentkeel, so the runner stays independent of
the host's state.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any

ALARM_GRACE_S = 2
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
OUT_OF_MEMORY = json.dumps(
    {"ok": False, "error": {"type": "MemoryError", "message": "out of memory", "retryable": False}}
).encode()


class RequestError(Exception):
    """The request names a tool that cannot be found or is malformed (never retryable)."""


class ResultNotJSONError(Exception):
    """The tool returned something that JSON cannot represent (never retryable)."""


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


def resolve(qualified_name: str) -> Callable[..., Any]:
    """The function named ``module:qualname`` (the ``@tool``-decorated function itself)."""
    module_name, sep, qualname = qualified_name.partition(":")
    if not sep or not module_name or not qualname:
        raise RequestError(f"tool reference {qualified_name!r} is not of the form 'module:qualname'")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise RequestError(
            f"tool {qualified_name!r} is defined inside a function; tools that run in a "
            f"subprocess must be module-level functions"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RequestError(
            f"cannot import module {module_name!r} in the sandbox child: {exc}; "
            f"install the plugin in the same environment as the host"
        ) from exc
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise RequestError(f"module {module_name!r} has no attribute {qualname!r}") from None
    if not callable(target):
        raise RequestError(f"{qualified_name!r} is not callable")
    return target  # type: ignore[no-any-return]


def invoke(fn: Callable[..., Any], args: Mapping[str, Any]) -> Any:
    """Call ``fn(**args)``; coroutine functions (and returned awaitables) run under ``asyncio.run``."""
    if inspect.iscoroutinefunction(inspect.unwrap(fn)):
        import asyncio  # only async tools pay for importing asyncio

        return asyncio.run(fn(**args))
    result = fn(**args)
    if inspect.iscoroutine(result):
        import asyncio

        return asyncio.run(result)
    return result


def _type_name(obj_type: type) -> str:
    if obj_type.__module__ == "builtins":
        return obj_type.__qualname__
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


def _not_json(obj: Any) -> Any:
    raise ResultNotJSONError(
        f"the tool returned a {_type_name(type(obj))}, which is not JSON; "
        f"tools run in a subprocess must return JSON values (dict, list, str, number, bool, None)"
    )


def encode_ok(value: Any, max_output_bytes: int) -> bytes:
    """The success envelope, or ``ResultNotJSONError`` for values JSON cannot carry."""
    try:
        data = json.dumps({"ok": True, "value": value}, default=_not_json, allow_nan=False).encode()
    except ValueError as exc:  # NaN / infinity, circular references
        raise ResultNotJSONError(f"the tool's result is not valid JSON: {exc}") from None
    if len(data) > max_output_bytes:
        raise ResultNotJSONError(
            f"the tool's result is {len(data)} bytes of JSON, more than the limit of "
            f"{max_output_bytes} bytes; return a reference (a path, an id) instead of the data"
        )
    return data


def encode_error(exc: BaseException) -> bytes:
    """The failure envelope for ``exc``; ``retryable`` follows the exception when it says."""
    if isinstance(exc, MemoryError):
        return OUT_OF_MEMORY
    if isinstance(exc, (RequestError, ResultNotJSONError)):
        error = {"type": type(exc).__name__, "message": str(exc), "retryable": False}
    else:
        retryable = getattr(exc, "retryable", True)
        error = {
            "type": _type_name(type(exc)),
            "message": _describe(exc),
            "retryable": retryable if isinstance(retryable, bool) else True,
        }
    return json.dumps({"ok": False, "error": error}).encode()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"the tool called sys.exit({exc.code!r})"
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not lose the error
        return f"<unprintable {type(exc).__name__}>"


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
        except BaseException:  # noqa: BLE001, S110 - the request meets the same error and reports it
            pass


def run_request(raw: bytes) -> bytes:
    """Run one request and return the result envelope; never raises for tool failures."""
    max_output_bytes = DEFAULT_MAX_OUTPUT_BYTES
    try:
        request = json.loads(raw)
        if not isinstance(request, dict) or not isinstance(request.get("args", {}), dict):
            raise RequestError("the request must be a JSON object with an object 'args'")
        max_output_bytes = int(request.get("max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES))
        apply_limits(request.get("limits", {}))
        deadline_s = request.get("deadline_s")
        if deadline_s:
            signal.alarm(math.ceil(float(deadline_s)) + ALARM_GRACE_S)
        if request.get("sys_path"):
            sys.path[:] = [str(p) for p in request["sys_path"]]
        fn = resolve(str(request.get("tool", "")))
        value = invoke(fn, request.get("args", {}))
        return encode_ok(value, max_output_bytes)
    except MemoryError:
        # Prebuilt: the failed frames still hold their memory until this block exits.
        return OUT_OF_MEMORY
    except ResultNotJSONError as exc:
        return encode_error(exc)
    except BaseException as exc:  # noqa: BLE001 - the tool's failure, whatever it is, becomes the result
        traceback.print_exc()
        return encode_error(exc)


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
        except Exception:  # noqa: BLE001, S110 - a broken stream must not lose the result
            pass
    _write_all(result_fd, payload)
    # Skip interpreter shutdown: stray non-daemon threads must not hold the result back.
    os._exit(0)


if __name__ == "__main__":
    main()
