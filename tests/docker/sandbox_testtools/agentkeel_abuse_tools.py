"""Hostile and ordinary tools for the docker abuse suite.

This module is copied into a test image (see tests/docker/conftest.py) and runs
*inside* sandbox containers; the host imports it only to build ToolSpecs.
"""

from __future__ import annotations

import errno
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
    """Stop the runner (our parent) so only the host can enforce the deadline."""
    os.kill(os.getppid(), signal.SIGSTOP)
    while True:
        time.sleep(1)


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


ALL = [sandbox_info, async_add, network_probe, fork_bomb, memory_bomb, disk_fill, write_outside, exec_from_tmp,
       read_host, docker_socket, infinite_loop, freeze_runner_then_spin, endless_stdout, signal_pid1, non_json,
       oversized, raises, refuses, refuses_custom, refuses_async]
