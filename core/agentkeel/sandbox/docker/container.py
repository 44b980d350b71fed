"""One single-use sandbox container, driven through its attach socket.

The container is created with stdin open, attached *before* it starts (so no
output is lost), and started; the runner then waits for one request line on
stdin. ``exchange`` writes the request and reads the demultiplexed stdout until
the runner's one-line result, with a deadline and a byte cap. Every method here
blocks: call them off the event loop.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import attrs

from agentkeel.sandbox.docker.settings import WORKDIR, DockerSettings, Limits, host_config_kwargs

_HEADER = struct.Struct(">BxxxL")
READY_MARKER = b"agentkeel-runner-ready"


@attrs.define
class Exchange:
    """What came back from one request: raw stdout/stderr bytes and how it ended."""

    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    overflow: bool = False
    eof: bool = False


@attrs.define(eq=False)
class SandboxContainer:
    """A created, attached and started container waiting for its one request."""

    api: Any
    id: str
    image: str
    sock: Any
    created_at: float
    _buffer: bytearray = attrs.field(factory=bytearray)
    _out: bytearray = attrs.field(factory=bytearray)
    _err: bytearray = attrs.field(factory=bytearray)

    @property
    def raw_socket(self) -> socket.socket:
        return getattr(self.sock, "_sock", self.sock)  # type: ignore[no-any-return]

    @classmethod
    def launch(
        cls,
        api: Any,
        image: str,
        settings: DockerSettings,
        limits: Limits,
        labels: dict[str, str],
    ) -> SandboxContainer:
        """Create, attach and start a hardened container running the image's runner."""
        host_config = api.create_host_config(**host_config_kwargs(settings, limits))
        created = api.create_container(
            image,
            user=f"{settings.uid}:{settings.uid}",
            environment={},
            labels=labels,
            stdin_open=True,  # with detach=False this also sets StdinOnce
            tty=False,
            working_dir=WORKDIR,
            network_disabled=True,
            host_config=host_config,
        )
        cid = created["Id"]
        try:
            sock = api.attach_socket(cid, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            api.start(cid)
        except BaseException:
            _force_remove(api, cid)
            raise
        return cls(api=api, id=cid, image=image, sock=sock, created_at=time.monotonic())

    def connected(self) -> bool:
        """Cheap liveness check of an idle container: its attach stream has not ended."""
        raw = self.raw_socket
        try:
            raw.setblocking(False)
            try:
                return raw.recv(1, socket.MSG_PEEK) != b""
            finally:
                raw.setblocking(True)
        except BlockingIOError:
            return True
        except OSError:
            return False

    @property
    def ready_seen(self) -> bool:
        """Whether the runner's ready marker has been read (true for pooled containers)."""
        return READY_MARKER in self._err

    def stderr_text(self) -> str:
        """What the runner wrote on stderr so far (its ready marker left out)."""
        return bytes(self._err).replace(READY_MARKER + b"\n", b"", 1).decode("utf-8", "replace")

    def wait_ready(self, timeout: float) -> bool:
        """Block until the runner says its worker is ready (stderr marker). False on EOF/timeout."""
        deadline = time.monotonic() + timeout
        while READY_MARKER not in self._err:
            if self._fill(deadline) != "data":
                return False
        return True

    def exchange(self, request: bytes, deadline: float, max_bytes: int) -> Exchange:
        """Send ``request`` (one line) and read until the runner's result line.

        ``deadline`` is a ``time.monotonic()`` instant; past it the read stops with
        ``timed_out``. More than ``max_bytes`` of output stops it with ``overflow``.
        """
        raw = self.raw_socket
        raw.settimeout(max(deadline - time.monotonic(), 0.001))
        raw.sendall(request.rstrip(b"\n") + b"\n")
        while b"\n" not in self._out:
            if len(self._out) + len(self._err) > max_bytes:
                return self._result(overflow=True)
            status = self._fill(deadline)
            if status == "timeout":
                return self._result(timed_out=True)
            if status == "eof":
                return self._result(eof=True)
        return self._result()

    def _result(self, **flags: bool) -> Exchange:
        err = bytes(self._err).replace(READY_MARKER + b"\n", b"", 1)
        return Exchange(bytes(self._out), err, **flags)

    def _fill(self, deadline: float) -> str:
        """Read one chunk and demultiplex complete frames: "data", "timeout" or "eof"."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        raw = self.raw_socket
        raw.settimeout(remaining)
        try:
            chunk = raw.recv(65536)
        except TimeoutError:
            return "timeout"
        except OSError:
            chunk = b""
        if not chunk:
            return "eof"
        buffer = self._buffer
        buffer.extend(chunk)
        while len(buffer) >= _HEADER.size:
            stream, size = _HEADER.unpack_from(buffer)
            if len(buffer) < _HEADER.size + size:
                break
            payload = bytes(buffer[_HEADER.size : _HEADER.size + size])
            del buffer[: _HEADER.size + size]
            (self._err if stream == 2 else self._out).extend(payload)
        return "data"

    def state(self, wait_s: float = 2.0) -> dict[str, Any]:
        """The container's ``State`` (after waiting up to ``wait_s`` for it to exit)."""
        try:
            self.api.wait(self.id, timeout=wait_s)
        except Exception:  # noqa: BLE001 - still running, or gone: inspect tells which
            pass
        try:
            return dict(self.api.inspect_container(self.id).get("State") or {})
        except Exception:  # noqa: BLE001 - a removed container has no state
            return {}

    def is_running(self) -> bool:
        try:
            return bool(self.api.inspect_container(self.id)["State"]["Running"])
        except Exception:  # noqa: BLE001 - a container that cannot be inspected is not running
            return False

    def destroy(self) -> None:
        """Kill and remove the container and close the socket; never raises."""
        try:
            self.raw_socket.close()
        except Exception:  # noqa: BLE001 - destroy never raises
            pass
        try:
            self.sock.close()
        except Exception:  # noqa: BLE001 - destroy never raises
            pass
        _force_remove(self.api, self.id)


def _force_remove(api: Any, cid: str) -> None:
    try:
        api.remove_container(cid, force=True)
    except Exception:  # noqa: BLE001 - already gone, or the daemon is: nothing left to remove
        pass
