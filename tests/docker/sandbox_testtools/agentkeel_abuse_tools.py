"""Hostile and ordinary tools for the docker abuse suite.

This module is copied into a test image (see tests/docker/conftest.py) and runs
*inside* sandbox containers; the host imports it only to build ToolSpecs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

from agentkeel import tool
from agentkeel.errors import ToolError

DOCKER: dict[str, Any] = {"isolation": "docker", "idempotent": True, "permissions": ["sandbox-test"]}


def _attempt(fn: Any) -> str:
    try:
        fn()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the point is to report how the attempt failed
        return f"{type(exc).__name__}: {exc}"


@tool(**DOCKER)
def sandbox_info(marker: str = "") -> dict[str, Any]:
    """Who and where the tool runs; writes ``marker`` to the work dir if given."""
    seen = sorted(os.listdir("/work"))
    if marker:
        with open(f"/work/{marker}", "w") as fh:
            fh.write(marker)
    return {"uid": os.getuid(), "gid": os.getgid(), "hostname": socket.gethostname(), "cwd": os.getcwd(),
            "work_before": seen, "env": dict(os.environ)}


@tool(**DOCKER)
async def async_add(a: int, b: int) -> int:
    """An async tool: the runner awaits it."""
    return a + b


@tool(**DOCKER)
def network_probe() -> dict[str, Any]:
    """What network the container has, read from the kernel; nothing is sent anywhere."""
    def routes(path: str, device_column: int) -> list[str]:
        try:
            with open(path) as fh:
                rows = [line.split() for line in fh.read().splitlines()]
        except OSError as exc:
            return [f"unreadable: {exc}"]
        return sorted({row[device_column] for row in rows if len(row) > device_column} - {"Iface"})

    return {"interfaces": " ".join(sorted(n for _, n in socket.if_nameindex())),
            "ipv4_route_devices": routes("/proc/net/route", 0),
            "ipv6_route_devices": routes("/proc/net/ipv6_route", 9)}


@tool(**DOCKER)
def fork_bomb() -> int:
    """Fork until the pids limit refuses; children sleep."""
    count = 0
    while True:
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        count += 1


@tool(**DOCKER)
def memory_bomb() -> int:
    """Allocate and touch memory until something stops us."""
    hog = []
    while True:
        hog.append(bytearray(16 * 1024 * 1024))
        hog[-1][::4096] = b"x" * len(hog[-1][::4096])


@tool(**DOCKER)
def disk_fill(path: str = "/tmp/fill") -> dict[str, Any]:
    """Write until the filesystem is full; report how far it got."""
    written = 0
    chunk = b"\0" * (1024 * 1024)
    try:
        with open(path, "wb") as fh:
            while written < 4 * 1024**3:
                fh.write(chunk)
                fh.flush()
                written += len(chunk)
    except OSError as exc:
        return {"written": written, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
    return {"written": written, "errno": None}


@tool(**DOCKER)
def write_outside() -> dict[str, str]:
    """Try to write outside the tmpfs mounts."""
    def write(path: str) -> Any:
        return lambda: open(path, "w").write("x")

    targets = ["/etc/agentkeel-test", "/opt/agentkeel/runner.py", "/usr/local/lib/x.py", "/root/x", "/x",
               "/var/tmp/x", "/dev/shm/x"]
    return {t: _attempt(write(t)) for t in targets}


@tool(**DOCKER)
def exec_from_tmp() -> dict[str, str]:
    """Copy a binary into /tmp and /work, make it executable, try to run it."""
    out = {}
    for folder in ("/tmp", "/work"):
        target = f"{folder}/mytrue"
        shutil.copy("/bin/true", target)
        os.chmod(target, 0o755)
        out[folder] = _attempt(lambda target=target: subprocess.run([target], check=True))
    return out


@tool(**DOCKER)
def read_host(paths: list[str]) -> dict[str, Any]:
    """The environment this tool sees, PID 1's environment, and whether ``paths`` exist."""
    try:
        pid1_env = open("/proc/1/environ", "rb").read().decode(errors="replace").split("\0")
    except OSError as exc:
        pid1_env = [f"{type(exc).__name__}: {exc}"]
    return {"env": dict(os.environ), "pid1_env": pid1_env, "exists": {p: os.path.exists(p) for p in paths}}


@tool(**DOCKER)
def docker_socket() -> dict[str, str]:
    """Look for and try to connect to the Docker socket (the engine's TCP port would need a
    route out, which the container does not have: see ``network_probe``)."""
    out = {}
    for path in ("/var/run/docker.sock", "/run/docker.sock"):
        def connect(p: str = path) -> None:
            s = socket.socket(socket.AF_UNIX)
            s.connect(p)
        out[path] = _attempt(connect)
    return out


@tool(**DOCKER)
def infinite_loop() -> None:
    """Spin forever."""
    while True:
        pass


@tool(**DOCKER)
def freeze_runner_then_spin() -> None:
    """Try to stop the runner (our parent, PID 1), then spin until a deadline stops us."""
    for pid in {1, os.getppid()}:
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    while True:
        time.sleep(0.1)


@tool(**DOCKER)
def sleep_then_answer(seconds: float = 5.0) -> str:
    """Sleep, then answer (the host freezes the container meanwhile)."""
    time.sleep(seconds)
    return "done"


@tool(**DOCKER)
def endless_stdout() -> None:
    """Print forever."""
    while True:
        print("x" * 1000, flush=True)


@tool(**DOCKER)
def signal_pid1() -> dict[str, str]:
    """Send signals to PID 1 and to the runner, then answer."""
    out = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL):
        out[f"pid1-{sig.name}"] = _attempt(lambda s=sig: os.kill(1, s))
    out["runner-SIGTERM"] = _attempt(lambda: os.kill(os.getppid(), signal.SIGTERM))
    time.sleep(0.5)
    out["alive"] = "yes"
    return out


@tool(**DOCKER)
def non_json() -> Any:
    """Return something JSON cannot encode."""
    return {"when": object()}


@tool(**DOCKER)
def oversized(mib: int = 4) -> str:
    """Return a string larger than the result limit."""
    return "x" * (mib * 1024 * 1024)


@tool(**DOCKER)
def raises() -> None:
    """Fail with a traceback."""
    raise ValueError("tool failed on purpose")


class Refusal(Exception):
    """A business refusal that is not agentkeel's ToolError but says that retrying cannot help."""

    retryable = False


@tool(**DOCKER)
def refuses() -> None:
    """Refuse for good: retrying cannot help."""
    raise ToolError("order 1001 was already refunded", retryable=False)


@tool(**DOCKER)
def refuses_custom() -> None:
    """Refuse with an exception of the tool's own that says it is not retryable."""
    raise Refusal("the card was declined")


@tool(**DOCKER)
async def refuses_async() -> None:
    """An async tool that refuses for good."""
    raise ToolError("the coupon has expired", retryable=False)


# --- the reply channel ------------------------------------------------------------

FORGED = "forged by the tool"


def _forged_reply_line() -> bytes:
    """A reply as the runner would write it, for the current protocol, with a made-up MAC."""
    from agentkeel.sandbox.docker.settings import RUNNER_PROTOCOL

    reply = {"v": RUNNER_PROTOCOL, "ok": True, "value": FORGED, "exit_code": 0, "stdout": "", "stderr": "",
             "stdout_truncated": False, "stderr_truncated": False, "duration_s": 0.0}
    body = json.dumps(reply, separators=(",", ":"))
    return f"{body}\n{'0' * 64} {body}\n".encode()


def _write_path(path: str, data: bytes) -> Any:
    def write() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    return write


@tool(**DOCKER)
def forge_reply_via_pid1(deep: bool = False) -> dict[str, str]:
    """Write a forged reply line (or one nested 100,000 levels deep) onto the container's
    stdout and stderr, the attach stream the host reads, through PID 1's descriptors."""
    line = b"[" * 100_000 + b"\n" if deep else _forged_reply_line()
    return {path: _attempt(_write_path(path, line)) for path in ("/proc/1/fd/1", "/proc/1/fd/2")}


@tool(**DOCKER)
def ptrace_pid1() -> dict[str, str]:
    """PTRACE_ATTACH to PID 1 (the runner) and to our parent; detach again if it worked."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    out = {}
    for pid in sorted({1, os.getppid()}):
        ctypes.set_errno(0)
        if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
            out[str(pid)] = "attached"
            os.waitpid(pid, 0x40000000)  # __WALL: wait for the stop, then let it go
            libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
        else:
            out[str(pid)] = errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
    return out


@tool(**DOCKER)
def read_pid1() -> dict[str, str]:
    """Open PID 1's stdin, memory, environment and descriptor table."""
    out = {}
    for path in ("/proc/1/fd/0", "/proc/1/fd/1", "/proc/1/mem", "/proc/1/environ"):
        out[path] = _attempt(lambda p=path: os.close(os.open(p, os.O_RDONLY)))
    out["/proc/1/fd"] = _attempt(lambda: os.listdir("/proc/1/fd"))
    with open("/proc/1/cmdline", "rb") as fh:
        out["cmdline"] = fh.read().replace(b"\0", b" ").decode().strip()
    with open("/proc/1/status") as fh:
        out["uid"] = next(line.split()[1] for line in fh if line.startswith("Uid:"))
    out["my_uid"] = str(os.getuid())
    return out


def _result_fd() -> int:
    """The worker's result pipe, from its command line (``runner.py --child RESULT_FD READY_FD``)."""
    with open("/proc/self/cmdline", "rb") as fh:
        argv = fh.read().split(b"\0")
    return int(argv[argv.index(b"--child") + 1])


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@tool(**DOCKER)
def writes_result(kind: str) -> None:
    """Write a hostile result envelope straight onto the worker's result pipe and exit."""
    data = {
        "deep": b'{"ok":true,"value":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep_200": b'{"ok":true,"value":' + b"[" * 200 + b"]" * 200 + b"}",
        "nan": b'{"ok":true,"value":{"score":NaN}}',
    }[kind]
    os.write(_result_fd(), data)
    os._exit(0)


@tool(**DOCKER)
def returns_deep(depth: int = 100_000) -> Any:
    """Return a list nested ``depth`` levels deep."""
    return _deep(depth)


@tool(**DOCKER)
def returns_nan() -> dict[str, Any]:
    """Return a NaN (floats are fine, this one is not)."""
    return {"ok": 0.5, "score": float("nan")}


@tool(**DOCKER)
def returns_float() -> dict[str, Any]:
    """Floats come back as they are."""
    return {"score": 0.25, "big": 1e300, "small": -2.5e-300}


@tool(**DOCKER)
def orphan_storm(count: int = 400) -> int:
    """Leave ``count`` short-lived orphans (double fork): without a reaping PID 1 their zombies
    would fill the pids limit and the next fork would fail."""
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            if os.fork() == 0:
                os._exit(0)  # the orphan: reparented to PID 1, which must reap it
            os._exit(0)
        os.waitpid(pid, 0)
    time.sleep(0.3)
    zombies = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    zombies += fh.read().rsplit(")", 1)[1].split()[0] == "Z"
            except OSError:
                pass
    return zombies


ALL = [sandbox_info, async_add, network_probe, fork_bomb, memory_bomb, disk_fill, write_outside, exec_from_tmp,
       read_host, docker_socket, infinite_loop, freeze_runner_then_spin, endless_stdout, signal_pid1, non_json,
       oversized, raises, refuses, refuses_custom, refuses_async, sleep_then_answer, forge_reply_via_pid1, ptrace_pid1,
       read_pid1, writes_result, returns_deep, returns_nan, returns_float, orphan_storm]
