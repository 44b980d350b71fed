"""``isolation = "docker"``: a stdio MCP server run inside a hardened container.

The container is created with the docker SDK (``docker`` is a dependency of
agentkeel itself): the server's command as entrypoint, stdin open, no TTY, the
root filesystem read-only with a small ``/tmp`` tmpfs, every capability
dropped, ``no-new-privileges``, user ``nobody`` (65534), no network unless
``network = true``, memory and process limits, only the configured
environment, and the configured ``volumes`` mounted read-only. The image is
never pulled: it must be present (build it, or ``docker pull`` it yourself).

The transport bridges the container's attach socket to the session's memory
streams: newline-delimited JSON-RPC written to its stdin, and its output
demultiplexed (Docker's 8-byte frame headers: stream, size) into stdout lines,
each parsed as a JSON-RPC message, and stderr lines for ``StderrTail``. On
exit stdin is closed, the container gets a grace period to exit, then it is
killed and removed.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import anyio.to_thread
import docker
import docker.errors
import mcp.types as types
from mcp.client._transport import TransportStreams
from mcp.shared.message import SessionMessage

from agentkeel_mcp.config import ServerConfig
from agentkeel_mcp.transports import StderrTail

log = logging.getLogger("agentkeel_mcp")

NOBODY = "65534:65534"
TMPFS = {"/tmp": "rw,noexec,nosuid,nodev,size=64m,mode=1777"}
STOP_GRACE_S = 2.0
READ_CHUNK = 65536
LABEL = "io.agentkeel.mcp-server"


class DockerStartError(RuntimeError):
    """The container could not be created or started; the message says why."""


def container_kwargs(cfg: ServerConfig) -> dict[str, Any]:
    """The hardened ``containers.create`` arguments for ``cfg`` (checked by the tests)."""
    assert cfg.command is not None and cfg.image is not None
    kwargs: dict[str, Any] = {
        "image": cfg.image,
        "entrypoint": [cfg.command],
        "command": list(cfg.args),
        "environment": dict(cfg.env),
        "stdin_open": True,
        "tty": False,
        "user": NOBODY,
        "read_only": True,
        "tmpfs": dict(TMPFS),
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "network_mode": "bridge" if cfg.network else "none",
        "mem_limit": f"{cfg.memory_mb}m",
        "memswap_limit": f"{cfg.memory_mb}m",
        "pids_limit": cfg.pids_limit,
        "volumes": {host: {"bind": target, "mode": "ro"} for host, target in cfg.volumes.items()},
        "labels": {LABEL: cfg.name},
    }
    if cfg.cwd is not None:
        kwargs["working_dir"] = cfg.cwd
    return kwargs


def _launch(cfg: ServerConfig) -> tuple[Any, Any, socket.socket]:
    """Create, attach and start the container (blocking; run in a worker thread)."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        raise DockerStartError(f"cannot reach the Docker engine ({exc})") from exc
    try:
        container = client.containers.create(**container_kwargs(cfg))
    except docker.errors.ImageNotFound as exc:
        client.close()
        raise DockerStartError(f"the image {cfg.image!r} is not present (it is never pulled: build or pull "
                               "it first)") from exc
    except docker.errors.DockerException as exc:
        client.close()
        raise DockerStartError(f"cannot create the container: {exc}") from exc
    try:
        attached = container.attach_socket(params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        container.start()
    except BaseException as exc:
        _remove(container)
        client.close()
        raise DockerStartError(f"cannot start the container: {exc}") from exc
    raw: socket.socket = getattr(attached, "_sock", attached)
    raw.settimeout(None)
    return client, container, raw


def _remove(container: Any) -> None:
    with suppress(docker.errors.DockerException):
        container.remove(force=True)


def _stop(client: Any, container: Any, raw: socket.socket) -> None:
    """Close stdin, give the server ``STOP_GRACE_S`` to exit, then kill and remove the container."""
    with suppress(OSError):
        raw.shutdown(socket.SHUT_WR)
    # A read timeout (requests) or an engine error: either way the container is killed below.
    with suppress(Exception):
        container.wait(timeout=STOP_GRACE_S)
    _remove(container)
    with suppress(OSError):
        raw.close()
    client.close()


class _Demux:
    """Docker's multiplexed attach stream: frames of (stream type, size) headers and payloads."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines = {1: bytearray(), 2: bytearray()}

    def feed(self, data: bytes) -> tuple[list[bytes], list[bytes]]:
        """Complete stdout and stderr lines found in ``data`` (and what came before it)."""
        self._buffer += data
        while len(self._buffer) >= 8:
            stream, size = struct.unpack(">BxxxL", self._buffer[:8])
            if len(self._buffer) < 8 + size:
                break
            payload = bytes(self._buffer[8:8 + size])
            del self._buffer[:8 + size]
            self._lines[2 if stream == 2 else 1] += payload
        return self._take(1), self._take(2)

    def _take(self, stream: int) -> list[bytes]:
        pending = self._lines[stream]
        *lines, rest = bytes(pending).split(b"\n")
        self._lines[stream] = bytearray(rest)
        return lines


def _parse(line: bytes) -> SessionMessage | Exception:
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except ValueError as exc:
        log.warning("mcp server in docker wrote a line that is not JSON-RPC: %r", line[:200])
        return exc


@asynccontextmanager
async def docker_transport(cfg: ServerConfig, tail: StderrTail) -> AsyncIterator[TransportStreams]:
    """Run the server in its container and talk JSON-RPC over the attach socket."""
    try:
        client, container, raw = await anyio.to_thread.run_sync(_launch, cfg)
    except DockerStartError as exc:
        raise OSError(f"docker: {exc}") from exc
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        demux = _Demux()
        try:
            async with read_writer:
                while True:
                    data = await anyio.to_thread.run_sync(raw.recv, READ_CHUNK, abandon_on_cancel=True)
                    if not data:
                        return  # the server exited (or closed its stdout)
                    out, err = demux.feed(data)
                    for line in err:
                        tail.add(line.decode("utf-8", "replace").rstrip())
                    for line in out:
                        if line.strip():
                            await read_writer.send(_parse(line))
        except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        finally:
            tail.closed.set()

    async def writer() -> None:
        try:
            async with write_reader:
                async for message in write_reader:
                    data = message.message.model_dump_json(by_alias=True, exclude_unset=True) + "\n"
                    await anyio.to_thread.run_sync(raw.sendall, data.encode())
        except (OSError, anyio.ClosedResourceError, anyio.BrokenResourceError):
            await read_writer.aclose()  # the session sees the end instead of a request hanging

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            try:
                yield read_stream, write_stream
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_stop, client, container, raw)
            for stream in (read_stream, write_stream, read_writer, write_reader):
                await stream.aclose()
