"""The "subprocess" sandbox: one fresh child process per tool call.

What it promises:

- The tool runs in ``python -m agentkeel.sandbox.subprocess.child`` (see that module for the
  protocol) in a new session and process group, under RLIMIT_AS (memory),
  RLIMIT_CPU, RLIMIT_NOFILE and no core dumps, with a minimal environment:
  PATH, HOME, locale, TZ, TMPDIR, AGENTKEEL_HOME and the import path, never the host's secrets.
- Past the call's timeout the whole process group (the child and anything it
  spawned) is killed with SIGKILL and ``ToolTimeoutError`` is raised.
  Cancelling the awaiting task kills and reaps the same way. Processes that
  leave the group (``setsid``) escape this; use the "docker" sandbox for them.
- Arguments and results are JSON; the child answers with the result envelope
  of ``agentkeel.sandbox.envelope`` (the one the docker runner uses too). A
  tool's exception becomes ``ToolError`` with its type and message
  (``retryable`` follows the exception's own ``retryable`` attribute when it
  has one); running out of memory, a crash, a result that is not JSON or larger
  than ``max_output_bytes`` are ``ToolError``\\s that say so. Each error carries ``stderr_tail``, the last
  bytes the child wrote to stderr (``print`` output included). What the child
  wrote is untrusted (a tool can write to the result channel itself): it is
  decoded with ``agentkeel.jsonvalue`` (bounded size and depth, no NaN, valid
  text) before anything looks at it, and anything it refuses is a ``ToolError``
  naming the field.

Configuration, ``[sandbox.subprocess]`` in agentkeel.toml: ``memory_mb`` (512),
``cpu_s`` (ceil(timeout) + 1), ``max_open_files`` (256), ``max_output_bytes``
(1 MiB), ``stderr_tail_bytes`` (4096), ``prestart`` (1: children started ahead
of time, so a call does not wait for the interpreter to start), ``preload``
(modules a prestarted child imports while it waits; the modules of tools
already called are added automatically), ``pass_env`` (extra variable names
to pass through) and ``env`` (variables to set). Prestarted children belong to
the event loop that started them and are killed by ``aclose``; each one still
serves exactly one call.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
from collections.abc import Mapping
from typing import Any

import attrs

import agentkeel.jsonvalue as jsonvalue
from agentkeel.config import Config
from agentkeel.errors import ConfigError, ToolError, ToolTimeoutError
from agentkeel.markers import hookimpl
from agentkeel.sandbox import envelope
from agentkeel.sandbox.protocol import SandboxBackend, ToolCall
from agentkeel.types import ToolSpec

CHILD_MODULE = "agentkeel.sandbox.subprocess.child"
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "AGENTKEEL_HOME")
READ_CHUNK = 64 * 1024
STREAM_LIMIT = 64 * 1024
STDERR_GRACE_S = 0.5
MAX_LEARNED_MODULES = 64


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@attrs.frozen
class SubprocessSettings:
    """Limits and environment of the subprocess sandbox (``[sandbox.subprocess]``)."""

    memory_mb: int = 512
    cpu_s: int | None = None
    max_open_files: int = 256
    max_output_bytes: int = 1 << 20
    stderr_tail_bytes: int = 4096
    prestart: int = 1
    preload: tuple[str, ...] = ()
    pass_env: tuple[str, ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    python: str = sys.executable

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> SubprocessSettings:
        """Validate ``section``; a bad value raises ``ConfigError`` naming the key."""
        known = {f.name for f in attrs.fields(cls)} - {"python"}
        for key, value in section.items():
            where = f"sandbox.subprocess.{key}"
            if key not in known:
                raise ConfigError(f"{where}: unknown setting; known settings are {sorted(known)}")
            if key in ("pass_env", "preload"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{where}: must be a list of names")
            elif key == "env":
                if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
                    raise ConfigError(f"{where}: must be a table of string values")
            elif key == "prestart":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ConfigError(f"{where}: must be an integer >= 0, got {value!r}")
            elif not _positive_int(value):
                raise ConfigError(f"{where}: must be a positive integer, got {value!r}")
        values = dict(section)
        for key in ("pass_env", "preload"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)

    def cpu_limit(self, timeout: float) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(timeout) + 1


class _StderrTail:
    """Keeps the last ``cap`` bytes a stream produced."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()

    async def collect(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(READ_CHUNK):
            self.data += chunk
            if len(self.data) > self.cap:
                del self.data[: len(self.data) - self.cap]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace").strip()


class _ChildProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Stream protocol that also reports the moment the process exits.

    ``Process.wait()`` only returns once every pipe is closed, which a
    grandchild holding stderr can delay forever; ``exited`` does not wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=STREAM_LIMIT, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()
        self.subprocess: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.subprocess = transport

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


class _Child:
    """A started child process: its streams, its exit, and the loop it belongs to."""

    def __init__(self, proc: asyncio.subprocess.Process, protocol: _ChildProtocol) -> None:
        self.proc = proc
        self.protocol = protocol
        self.loop = protocol.exited.get_loop()

    @property
    def running(self) -> bool:
        return not self.protocol.exited.done()

    def kill_group(self) -> None:
        """SIGKILL the child's process group (its session: pgid == pid)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    async def exit(self) -> None:
        """Wait until the child has exited and been reaped (its pipes may still be open)."""
        # Shielded: a cancelled waiter must not cancel the shared future.
        await asyncio.shield(self.protocol.exited)

    async def reap(self) -> None:
        """Kill the group and wait until the child has exited and been reaped."""
        self.kill_group()
        await self.exit()

    def close_pipes(self) -> None:
        """Stop reading pipes still held open by processes that escaped the group."""
        if self.protocol.subprocess is not None and not self.protocol.subprocess.is_closing():
            self.protocol.subprocess.close()


class _Exchange:
    """One call's child process and the tasks that feed it and drain its stderr."""

    def __init__(self, child: _Child, tail: _StderrTail) -> None:
        self.child = child
        self.tail = tail
        self.tasks: list[asyncio.Task[None]] = []


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    if stdin is None:
        return
    try:
        stdin.write(data)
        await stdin.drain()
        stdin.close()
        await stdin.wait_closed()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child died first; its exit status tells why


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, bool]:
    """Read to EOF, or stop once more than ``cap`` bytes arrived (then the flag is True)."""
    if stream is None:
        return b"", False
    chunks: list[bytes] = []
    total = 0
    while chunk := await stream.read(READ_CHUNK):
        total += len(chunk)
        if total > cap:
            return b"", True
        chunks.append(chunk)
    return b"".join(chunks), False


def _minimal_env(settings: SubprocessSettings) -> dict[str, str]:
    """Only what a Python tool needs to start; secrets in the host's environment stay there."""
    env = {name: os.environ[name] for name in (*BASE_ENV, *settings.pass_env) if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env["PYTHONPATH"] = os.pathsep.join(_import_path())
    env.update(settings.env)
    return env


def _import_path() -> list[str]:
    """The host's ``sys.path`` made absolute, so the child imports the same modules."""
    seen: dict[str, None] = {}
    for entry in sys.path:
        seen.setdefault(os.path.abspath(entry) if entry else os.getcwd(), None)
    return list(seen)


def _check_importable(spec: ToolSpec) -> None:
    module, _, qualname = spec.qualified_name.partition(":")
    if module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ToolError(
            f"tool {spec.name!r} ({spec.qualified_name}) cannot run in a subprocess: the child imports "
            f"tools by module and name, so define it at module level in an importable module",
            retryable=False,
        )


class SubprocessBackend:
    """Runs each call in a fresh, resource-limited child process (see module docs)."""

    strength = 10

    def __init__(self, settings: SubprocessSettings | None = None) -> None:
        self.settings = settings or SubprocessSettings()
        self._spares: list[_Child] = []
        self._spare_loop: asyncio.AbstractEventLoop | None = None
        self._starting: set[asyncio.Task[None]] = set()
        self._closed = False
        self._modules: dict[str, None] = dict.fromkeys(self.settings.preload)

    @classmethod
    def from_config(cls, config: Config) -> SubprocessBackend:
        return cls(SubprocessSettings.from_mapping(config.section("sandbox", "subprocess")))

    async def run(self, call: ToolCall) -> Any:
        spec = call.spec
        _check_importable(spec)
        request = self._request(call)
        if len(self._modules) < MAX_LEARNED_MODULES:
            self._modules.setdefault(spec.fn.__module__)
        tail = _StderrTail(self.settings.stderr_tail_bytes)
        exchange: _Exchange | None = None
        deadline = asyncio.timeout(call.timeout)
        try:
            async with deadline:
                exchange = _Exchange(await self._child(), tail)
                output, oversized = await self._exchange(exchange, request)
        except TimeoutError:
            await self._finish(exchange)
            if not deadline.expired():
                raise
            error: ToolError = ToolTimeoutError(
                f"tool {spec.name!r} timed out after {call.timeout:g}s; its process group was killed. "
                f"Raise the tool's timeout if it needs longer"
            )
            raise self._with_tail(error, tail) from None
        except BaseException:
            await self._finish(exchange)  # cancellation included: kill and reap, then re-raise
            raise
        await self._finish(exchange)
        assert exchange is not None
        return self._result(call, exchange.child.proc.returncode, output, oversized, tail)

    async def aclose(self) -> None:
        """Stop prestarting and kill the spare children."""
        self._closed = True
        loop = asyncio.get_running_loop()
        starting = [task for task in self._starting if task.get_loop() is loop]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        await self._drop_spares()

    # --- the child ------------------------------------------------------------------

    def _request(self, call: ToolCall) -> bytes:
        request = {
            "tool": call.spec.qualified_name,
            "args": dict(call.args),
            "deadline_s": call.timeout,
            "limits": {
                "memory_mb": self.settings.memory_mb,
                "cpu_s": self.settings.cpu_limit(call.timeout),
                "max_open_files": self.settings.max_open_files,
            },
            "max_output_bytes": self.settings.max_output_bytes,
            "sys_path": _import_path(),
        }
        try:
            return json.dumps(request, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise ToolError(
                f"tool {call.spec.name!r}: arguments must be JSON to cross into a subprocess: {exc}",
                retryable=False,
            ) from None

    async def _spawn(self) -> _Child:
        startup = {
            "limits": {"memory_mb": self.settings.memory_mb, "max_open_files": self.settings.max_open_files},
            "preload": list(self._modules),
        }
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: _ChildProtocol(loop),
            self.settings.python,
            "-P",  # no current directory on sys.path: imports come from the host's path only
            "-m",
            CHILD_MODULE,
            json.dumps(startup),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=_minimal_env(self.settings),
        )
        return _Child(asyncio.subprocess.Process(transport, protocol, loop), protocol)

    async def _child(self) -> _Child:
        """A prestarted child of this event loop if one is ready, else a new one."""
        loop = asyncio.get_running_loop()
        if self._spare_loop is not loop:
            # Spares belong to the loop that started them; one loop at a time is supported.
            await self._drop_spares()
            self._spare_loop = loop
            self._starting = set()
        child: _Child | None = None
        while self._spares and child is None:
            candidate = self._spares.pop()
            if candidate.running:
                child = candidate
        if child is None:
            child = await self._spawn()
        self._prestart()
        return child

    def _prestart(self) -> None:
        missing = self.settings.prestart - len(self._spares) - len(self._starting)
        for _ in range(max(0, missing) if not self._closed else 0):
            task = asyncio.get_running_loop().create_task(self._start_spare())
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _start_spare(self) -> None:
        child = await self._spawn()
        if self._closed or self._spare_loop is not asyncio.get_running_loop():
            await child.reap()
            return
        self._spares.append(child)

    async def _drop_spares(self) -> None:
        spares, self._spares = self._spares, []
        loop = asyncio.get_running_loop()
        for child in spares:
            child.kill_group()
            if child.loop is loop:
                await child.exit()

    # --- one exchange ---------------------------------------------------------------

    async def _exchange(self, exchange: _Exchange, request: bytes) -> tuple[bytes, bool]:
        proc = exchange.child.proc
        loop = asyncio.get_running_loop()
        exchange.tasks.append(loop.create_task(_feed(proc.stdin, request)))
        if proc.stderr is not None:
            exchange.tasks.append(loop.create_task(exchange.tail.collect(proc.stderr)))
        output, oversized = await _read_capped(proc.stdout, self.settings.max_output_bytes)
        if oversized:
            exchange.child.kill_group()
        await exchange.child.exit()
        return output, oversized

    async def _finish(self, exchange: _Exchange | None) -> None:
        """Kill whatever is left of the group, reap the child, let stderr drain briefly."""
        if exchange is None:
            return
        await exchange.child.reap()
        if exchange.tasks:
            _, pending = await asyncio.wait(exchange.tasks, timeout=STDERR_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        exchange.child.close_pipes()

    # --- interpreting the outcome ---------------------------------------------------

    def _result(
        self, call: ToolCall, returncode: int | None, output: bytes, oversized: bool, tail: _StderrTail
    ) -> Any:
        name = call.spec.name
        if oversized:
            raise self._with_tail(
                ToolError(
                    f"tool {name!r} wrote more than {self.settings.max_output_bytes} bytes of result; the "
                    f"child was killed. Return a reference (a path, an id) instead of the data",
                    retryable=False,
                ),
                tail,
            )
        try:
            outcome = _decode(output, self.settings.max_output_bytes)
        except jsonvalue.JSONValueError as exc:
            if returncode:  # the child died, maybe mid-write: its status says why
                raise self._with_tail(self._crash(call, returncode, output, tail), tail) from None
            preview = output[:80].decode("utf-8", "replace")
            raise self._with_tail(
                ToolError(f"tool {name!r}: the child process wrote output that is not a result: {exc} "
                          f"(it starts {preview!r})", retryable=False),
                tail,
            ) from None
        if isinstance(outcome, envelope.Success):
            return outcome.value
        if isinstance(outcome, envelope.Failure):
            raise self._with_tail(self._tool_failure(name, outcome), tail)
        raise self._with_tail(self._crash(call, returncode, output, tail), tail)

    def _tool_failure(self, name: str, failure: envelope.Failure) -> ToolError:
        """The child's failure envelope as a ToolError; ``retryable`` as the envelope says."""
        if failure.kind == envelope.OUT_OF_MEMORY:
            return self._out_of_memory(name)
        if failure.kind == envelope.TIMEOUT:
            return ToolTimeoutError(failure.describe(f"tool {name!r}"))
        return ToolError(failure.describe(f"tool {name!r}"), retryable=failure.retryable)

    def _out_of_memory(self, name: str) -> ToolError:
        return ToolError(
            f"tool {name!r} ran out of memory (limit {self.settings.memory_mb} MiB of address space); "
            f"raise [sandbox.subprocess] memory_mb or give the tool less data",
            retryable=False,
        )

    def _crash(self, call: ToolCall, returncode: int | None, output: bytes, tail: _StderrTail) -> ToolError:
        name = call.spec.name
        stderr = tail.text()
        where = f"; last stderr: {stderr}" if stderr else ""
        if "MemoryError" in stderr:
            return self._out_of_memory(name)
        if returncode is not None and returncode < 0:
            signum = -returncode
            if signum == signal.SIGXCPU:
                cpu = self.settings.cpu_limit(call.timeout)
                return ToolError(
                    f"tool {name!r} used more than its CPU time limit of {cpu}s and was stopped; "
                    f"raise [sandbox.subprocess] cpu_s or the tool's timeout",
                    retryable=False,
                )
            if signum == signal.SIGALRM:
                return ToolTimeoutError(f"tool {name!r} ran past its deadline of {call.timeout:g}s")
            return ToolError(
                f"tool {name!r}: the child process died from signal {signal.Signals(signum).name} "
                f"(SIGKILL also means the system ran out of memory){where}"
            )
        if returncode:
            return ToolError(
                f"tool {name!r}: the child process exited with status {returncode} without a result{where}"
            )
        preview = output[:200].decode("utf-8", "replace")
        return ToolError(
            f"tool {name!r}: the child process wrote output that is not a result ({preview!r}); "
            f"this is a bug in the sandbox child or the interpreter{where}"
        )

    @staticmethod
    def _with_tail(error: ToolError, tail: _StderrTail) -> ToolError:
        error.stderr_tail = tail.text()
        return error


# The envelope wraps the tool's value in one object: the value itself gets jsonvalue's full depth.
ENVELOPE_MAX_DEPTH = jsonvalue.MAX_DEPTH + 1


def _decode(output: bytes, max_bytes: int) -> envelope.Success | envelope.Failure | None:
    """The child's result envelope; None when it wrote none (a crash) or JSON that is not an envelope.

    Raises ``JSONValueError`` naming the field when the output is not acceptable
    JSON (not JSON, too deep, too large, NaN or infinity, broken text).
    """
    if not output:
        return None
    obj = jsonvalue.loads(output, what="the result envelope", max_bytes=max_bytes, max_depth=ENVELOPE_MAX_DEPTH)
    try:
        return envelope.decode(obj if isinstance(obj, dict) else {})
    except envelope.MalformedEnvelopeError:
        return None


@hookimpl
def agentkeel_register_sandboxes(register: Any, config: Config) -> None:
    backend: SandboxBackend = SubprocessBackend.from_config(config)
    register("subprocess", backend)
